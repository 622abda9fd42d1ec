//! `cargo lambda build --release` for x86_64 makes the `bootstrap` that
//! `sam build` (BuildMethod: rust-cargolambda) packages. Only x86_64: the
//! aarch64 standard library cannot be fetched on these machines, and no
//! test may add a rustup target. It builds into target/lambda-build (its
//! own CARGO_TARGET_DIR) so it does not wait on the lock of the target
//! directory the test run itself holds. cargo-lambda comes from
//! scripts/services/aws-tools.sh; without it this test fails, it never skips.

use std::path::Path;
use std::process::Command;

/// ELF header fields this test reads (little-endian, 64-bit).
const ELF_MAGIC: &[u8] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;

#[test]
fn cargo_lambda_builds_an_x86_64_bootstrap() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target_dir = root.join("target/lambda-build");
    let out = Command::new("cargo")
        .args([
            "lambda",
            "build",
            "--release",
            "--x86-64",
            // Fail instead of letting cargo-lambda try to install anything.
            "--skip-target-check",
            "--bin",
            "cachegate",
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTUP_AUTO_INSTALL", "0")
        .current_dir(root)
        .output()
        .expect("`cargo lambda` not found: scripts/test installs cargo-lambda");
    assert!(
        out.status.success(),
        "cargo lambda build --release --x86-64 failed: exit {:?}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );

    let bootstrap = target_dir.join("lambda/cachegate/bootstrap");
    let bytes =
        std::fs::read(&bootstrap).unwrap_or_else(|e| panic!("{}: {e}", bootstrap.display()));
    assert!(bytes.len() > 64, "{} is too short", bootstrap.display());
    assert_eq!(&bytes[..4], ELF_MAGIC, "not an ELF file");
    assert_eq!(bytes[4], ELFCLASS64, "not a 64-bit ELF");
    assert_eq!(bytes[5], ELFDATA2LSB, "not little-endian");
    let e_type = u16::from_le_bytes([bytes[16], bytes[17]]);
    let e_machine = u16::from_le_bytes([bytes[18], bytes[19]]);
    assert!(
        e_type == ET_EXEC || e_type == ET_DYN,
        "ELF type {e_type}: not an executable"
    );
    assert_eq!(e_machine, EM_X86_64, "not an x86-64 binary");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&bootstrap).unwrap().permissions().mode();
        assert!(mode & 0o111 != 0, "bootstrap is not executable: {mode:o}");
    }
    // The release profile strips symbols: no .symtab section name left.
    assert!(
        !bytes.windows(8).any(|w| w == b".symtab\0"),
        "bootstrap still carries a symbol table (profile.release.strip)"
    );
    eprintln!(
        "bootstrap: {} bytes ({:.1} MiB), {}",
        bytes.len(),
        bytes.len() as f64 / (1024.0 * 1024.0),
        bootstrap.display()
    );
}

//! `template.yaml` (AWS SAM), checked without AWS:
//!
//! - cfn-lint (SAM transform included) finds nothing: no error, no warning,
//!   no informational finding, on the template and on copies whose parameter
//!   defaults select each `BackendType` / `MultiAZ` (what `sam deploy` without
//!   overrides would deploy);
//! - `sam validate --lint` accepts it, offline (region and dummy credentials
//!   set, a throw-away HOME);
//! - what each parameter choice deploys: the template is read (YAML to JSON
//!   by PyYAML, which cfn-lint brings), its Conditions evaluated for every
//!   BackendType x MultiAZ x EnableCloudFront, and the resources that remain
//!   checked against what the backends and the proxy rely on (the DynamoDB
//!   schema pk/sk/ttl, IAM limited to the table, Redis reachable only from
//!   the function, TLS and AUTH, the CloudFront TTLs, the environment; the
//!   invalidator's events, queues and purge-only permissions).
//!
//! The tools come from scripts/services/aws-tools.sh (run by scripts/test),
//! which exports CACHEGATE_TEST_CFN_LINT and CACHEGATE_TEST_SAM; without them
//! these tests fail, they never skip.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

use common::describe;

fn template_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("template.yaml")
}

/// The executable named by `var`; panics (fails the test) when unset.
fn tool(var: &str) -> PathBuf {
    let path = std::env::var_os(var).unwrap_or_else(|| {
        panic!(
            "{var} is not set: run the tests through scripts/test, whose \
             scripts/services/aws-tools.sh installs the tool and exports {var}"
        )
    });
    let path = PathBuf::from(path);
    assert!(path.is_file(), "{var}={} is not a file", path.display());
    path
}

/// A fresh directory for one test, used as HOME and working directory so
/// no user or repository config (.cfnlintrc, samconfig.toml, ~/.aws) leaks in.
fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("cachegate-template-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn isolated(program: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(dir)
        .env("HOME", dir)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
        .env(
            "AWS_SECRET_ACCESS_KEY",
            "dummy-secret-for-offline-validation",
        )
        .env("AWS_CONFIG_FILE", dir.join("aws-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.join("aws-credentials"))
        .env("SAM_CLI_TELEMETRY", "0")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN");
    cmd
}

fn assert_silent_success(what: &str, out: &Output) {
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{what}: expected exit 0 and no output\n{}",
        describe(out)
    );
}

/// `text` with the `Default:` of parameter `name` set to `value` (added
/// when the parameter has none). Works on the template's own layout:
/// parameters at two spaces of indentation, their keys at four.
fn with_default(text: &str, name: &str, value: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| *l == format!("  {name}:"))
        .unwrap_or_else(|| panic!("parameter {name} not found in template.yaml"));
    let end = lines[start + 1..]
        .iter()
        .position(|l| !l.starts_with("    "))
        .map_or(lines.len(), |i| start + 1 + i);
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let default = format!("    Default: \"{value}\"");
    match (start + 1..end).find(|&i| lines[i].starts_with("    Default:")) {
        Some(i) => out[i] = default,
        None => out.insert(start + 1, default),
    }
    out.join("\n") + "\n"
}

#[test]
fn cfn_lint_finds_nothing() {
    let cfn_lint = tool("CACHEGATE_TEST_CFN_LINT");
    let dir = scratch("cfn-lint");
    let out = isolated(&cfn_lint, &dir)
        .arg("--")
        .arg(template_path())
        .output()
        .expect("run cfn-lint");
    assert_silent_success("cfn-lint template.yaml", &out);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cfn_lint_finds_nothing_with_each_backend_as_default() {
    let cfn_lint = tool("CACHEGATE_TEST_CFN_LINT");
    let dir = scratch("cfn-lint-variants");
    let text = std::fs::read_to_string(template_path()).unwrap();
    let mut files = Vec::new();
    for backend in ["redis", "dynamodb"] {
        for multi_az in ["true", "false"] {
            let mut t = with_default(&text, "BackendType", backend);
            t = with_default(&t, "MultiAZ", multi_az);
            t = with_default(&t, "EnableCloudFront", "true");
            t = with_default(&t, "DefaultTtl", "60");
            t = with_default(&t, "UpstreamUrl", "https://api.example.com/v1");
            let file = dir.join(format!("template-{backend}-multiaz-{multi_az}.yaml"));
            std::fs::write(&file, t).unwrap();
            files.push(file);
        }
    }
    let out = isolated(&cfn_lint, &dir)
        .arg("--")
        .args(&files)
        .output()
        .expect("run cfn-lint");
    assert_silent_success("cfn-lint on the per-backend copies", &out);

    // Control: the same run does report a broken copy (the linter is live
    // and sees through the SAM transform).
    let broken = text.replace(
        "RetentionInDays: !Ref LogRetentionDays",
        "RetentionInDays: 13",
    );
    assert_ne!(broken, text, "control edit did not apply");
    let file = dir.join("template-broken.yaml");
    std::fs::write(&file, broken).unwrap();
    let out = isolated(&cfn_lint, &dir)
        .arg("--")
        .arg(&file)
        .output()
        .expect("run cfn-lint");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && stdout.contains("E3030"),
        "cfn-lint missed an invalid RetentionInDays\n{}",
        describe(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sam_validate_lint_accepts_the_template() {
    let sam = tool("CACHEGATE_TEST_SAM");
    let dir = scratch("sam");
    let out = isolated(&sam, &dir)
        .args(["validate", "--lint", "--template-file"])
        .arg(template_path())
        .output()
        .expect("run sam validate --lint");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("is a valid SAM Template"),
        "sam validate --lint failed\n{}",
        describe(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// What each parameter choice deploys
// ---------------------------------------------------------------------------

/// YAML to JSON with the short intrinsic tags (`!Ref`, `!Sub`, ...) turned
/// into their long forms.
const YAML_TO_JSON: &str = r#"
import json, sys, yaml
class Loader(yaml.SafeLoader):
    pass
def intrinsic(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix in ("Ref", "Condition"):
        return {suffix: value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {"Fn::" + suffix: value}
Loader.add_multi_constructor("!", intrinsic)
with open(sys.argv[1]) as f:
    print(json.dumps(yaml.load(f, Loader=Loader)))
"#;

fn template_json() -> Value {
    let out = Command::new("python3")
        .args(["-c", YAML_TO_JSON])
        .arg(template_path())
        .output()
        .expect("run python3 (it comes with cfn-lint's install: scripts/services/aws-tools.sh)");
    assert!(
        out.status.success(),
        "python3 could not read template.yaml (PyYAML comes with cfn-lint)\n{}",
        describe(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The template as CloudFormation would deploy it for one set of parameter
/// values: resources whose Condition holds, with `Fn::If` decided and
/// `AWS::NoValue` removed.
struct Deployed {
    params: BTreeMap<String, String>,
    resources: BTreeMap<String, Value>,
    outputs: BTreeMap<String, Value>,
}

struct Evaluator<'a> {
    template: &'a Value,
    params: BTreeMap<String, String>,
}

impl Evaluator<'_> {
    fn scalar(&self, v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Object(m) if m.len() == 1 && m.contains_key("Ref") => {
                let name = m["Ref"].as_str().unwrap();
                self.params
                    .get(name)
                    .unwrap_or_else(|| panic!("condition refers to unknown parameter {name}"))
                    .clone()
            }
            other => panic!("unsupported value in a condition: {other}"),
        }
    }

    fn holds(&self, expr: &Value) -> bool {
        let m = expr.as_object().expect("a condition is an object");
        assert_eq!(m.len(), 1, "condition with several keys: {expr}");
        let (f, args) = m.iter().next().unwrap();
        match f.as_str() {
            "Condition" => self.condition(args.as_str().unwrap()),
            "Fn::Equals" => self.scalar(&args[0]) == self.scalar(&args[1]),
            "Fn::Not" => !self.holds(&args[0]),
            "Fn::And" => args.as_array().unwrap().iter().all(|a| self.holds(a)),
            "Fn::Or" => args.as_array().unwrap().iter().any(|a| self.holds(a)),
            other => panic!("unsupported condition function {other}"),
        }
    }

    fn condition(&self, name: &str) -> bool {
        let expr = self.template["Conditions"]
            .get(name)
            .unwrap_or_else(|| panic!("unknown condition {name}"));
        self.holds(expr)
    }

    fn resolve(&self, v: &Value) -> Option<Value> {
        match v {
            Value::Object(m) if m.len() == 1 && m.contains_key("Fn::If") => {
                let a = m["Fn::If"].as_array().unwrap();
                let branch = if self.condition(a[0].as_str().unwrap()) {
                    &a[1]
                } else {
                    &a[2]
                };
                self.resolve(branch)
            }
            Value::Object(m) if m.len() == 1 && m.get("Ref") == Some(&json!("AWS::NoValue")) => {
                None
            }
            Value::Object(m) => Some(Value::Object(
                m.iter()
                    .filter_map(|(k, v)| self.resolve(v).map(|v| (k.clone(), v)))
                    .collect(),
            )),
            Value::Array(a) => Some(Value::Array(
                a.iter().filter_map(|v| self.resolve(v)).collect(),
            )),
            other => Some(other.clone()),
        }
    }

    fn kept(&self, entries: &Value) -> BTreeMap<String, Value> {
        entries
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, r)| {
                r.get("Condition")
                    .is_none_or(|c| self.condition(c.as_str().unwrap()))
            })
            .map(|(k, r)| (k.clone(), self.resolve(r).unwrap()))
            .collect()
    }
}

fn deploy(template: &Value, overrides: &[(&str, &str)]) -> Deployed {
    let mut params: BTreeMap<String, String> = template["Parameters"]
        .as_object()
        .unwrap()
        .iter()
        .filter_map(|(k, p)| {
            p.get("Default").map(|d| {
                let d = match d {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), d)
            })
        })
        .collect();
    for (k, v) in overrides {
        assert!(template["Parameters"].get(*k).is_some(), "no parameter {k}");
        params.insert(k.to_string(), v.to_string());
    }
    let ev = Evaluator { template, params };
    Deployed {
        resources: ev.kept(&template["Resources"]),
        outputs: ev.kept(&template["Outputs"]),
        params: ev.params,
    }
}

impl Deployed {
    fn props(&self, name: &str) -> &Value {
        let r = self
            .resources
            .get(name)
            .unwrap_or_else(|| panic!("{}: resource {name} is not deployed", self.label()));
        &r["Properties"]
    }

    fn of_type(&self, ty: &str) -> Vec<(&String, &Value)> {
        self.resources
            .iter()
            .filter(|(_, r)| r["Type"] == ty)
            .collect()
    }

    fn label(&self) -> String {
        format!(
            "BackendType={} MultiAZ={} EnableCloudFront={}",
            self.params["BackendType"], self.params["MultiAZ"], self.params["EnableCloudFront"]
        )
    }
}

fn reference(name: &str) -> Value {
    json!({ "Ref": name })
}

/// Every string under `v`, with its JSON path.
fn strings<'a>(v: &'a Value, path: String, out: &mut Vec<(String, &'a str)>) {
    match v {
        Value::String(s) => out.push((path, s)),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, v)| strings(v, format!("{path}/{i}"), out)),
        Value::Object(m) => m
            .iter()
            .for_each(|(k, v)| strings(v, format!("{path}/{k}"), out)),
        _ => {}
    }
}

const DYNAMODB_ACTIONS: [&str; 8] = [
    "dynamodb:BatchGetItem",
    "dynamodb:BatchWriteItem",
    "dynamodb:DeleteItem",
    "dynamodb:DescribeTable",
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:Query",
    "dynamodb:UpdateItem",
];

/// AllViewerExceptHostHeader (AWS managed origin request policy).
const ALL_VIEWER_EXCEPT_HOST: &str = "b689b0a8-53d0-40ab-baf2-68738e2966ac";

fn check_common(d: &Deployed) {
    let l = d.label();
    let f = &d.resources["CacheFunction"];
    assert_eq!(f["Type"], "AWS::Serverless::Function");
    assert_eq!(f["Metadata"]["BuildMethod"], "rust-cargolambda", "{l}");
    assert_eq!(
        f["Metadata"]["BuildProperties"]["Binary"], "cachegate",
        "{l}"
    );
    let p = &f["Properties"];
    assert_eq!(p["Runtime"], "provided.al2023", "{l}");
    assert_eq!(p["Handler"], "bootstrap", "{l}");
    assert_eq!(
        p["Architectures"],
        json!([reference("Architecture")]),
        "{l}"
    );
    assert_eq!(p["MemorySize"], reference("FunctionMemory"), "{l}");
    assert_eq!(
        p["Role"],
        json!({"Fn::GetAtt": ["FunctionRole", "Arn"]}),
        "{l}"
    );
    assert_eq!(
        p["LoggingConfig"]["LogGroup"],
        reference("FunctionLogGroup"),
        "{l}"
    );
    assert_eq!(
        d.props("FunctionLogGroup")["RetentionInDays"],
        reference("LogRetentionDays"),
        "{l}"
    );

    // The catch-all routes on the HTTP API.
    let mut routes = BTreeSet::new();
    for (_, e) in p["Events"].as_object().unwrap() {
        assert_eq!(e["Type"], "HttpApi", "{l}");
        assert_eq!(e["Properties"]["ApiId"], reference("HttpApi"), "{l}");
        routes.insert((
            e["Properties"]["Path"].as_str().unwrap().to_string(),
            e["Properties"]["Method"].as_str().unwrap().to_string(),
        ));
    }
    let want: BTreeSet<_> = [("/", "ANY"), ("/{proxy+}", "ANY")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(routes, want, "{l}");
    assert_eq!(d.resources["HttpApi"]["Type"], "AWS::Serverless::HttpApi");

    // The environment the proxy reads (figment, CACHEGATE_ and "__").
    let env = p["Environment"]["Variables"].as_object().unwrap();
    assert_eq!(env["CACHEGATE_BACKEND"], reference("BackendType"), "{l}");
    assert_eq!(
        env["CACHEGATE_UPSTREAM__URL"],
        reference("UpstreamUrl"),
        "{l}"
    );
    if d.params["DefaultTtl"] == "0" {
        assert!(
            !env.contains_key("CACHEGATE_CACHE__DEFAULT_TTL"),
            "{l}: DefaultTtl 0 must leave it unset"
        );
    } else {
        assert_eq!(
            env["CACHEGATE_CACHE__DEFAULT_TTL"],
            json!({"Fn::Sub": "${DefaultTtl}s"}),
            "{l}"
        );
    }
    let names: BTreeSet<&str> = env.keys().map(String::as_str).collect();
    let redis = d.params["BackendType"] == "redis";
    assert_eq!(
        names.contains("CACHEGATE_REDIS__URL"),
        redis,
        "{l}: {names:?}"
    );
    assert_eq!(
        names.contains("CACHEGATE_REDIS__PASSWORD"),
        redis,
        "{l}: {names:?}"
    );
    assert_eq!(
        names.contains("CACHEGATE_DYNAMODB__TABLE"),
        !redis,
        "{l}: {names:?}"
    );

    // No IAM statement anywhere grants a wildcard action or resource.
    for (name, r) in d.resources.iter().filter(|(_, r)| {
        r["Type"]
            .as_str()
            .is_some_and(|t| t.starts_with("AWS::IAM::"))
    }) {
        let mut found = Vec::new();
        strings(&r["Properties"], name.clone(), &mut found);
        for (path, s) in found {
            if path.contains("/Resource") || path.contains("/Action") {
                assert!(!s.contains('*'), "{l}: wildcard in IAM at {path}: {s}");
            }
        }
    }

    // Outputs.
    assert!(d.outputs.contains_key("ApiUrl"), "{l}");
    assert!(d.outputs.contains_key("BackendEndpoint"), "{l}");
}

fn check_dynamodb(d: &Deployed) {
    let l = d.label();
    for (name, r) in &d.resources {
        let ty = r["Type"].as_str().unwrap();
        assert!(
            !ty.starts_with("AWS::EC2::")
                && !ty.starts_with("AWS::ElastiCache::")
                && !ty.starts_with("AWS::SecretsManager::"),
            "{l}: {name} ({ty}) deployed without Redis"
        );
    }
    let f = d.props("CacheFunction");
    assert!(
        f.get("VpcConfig").is_none(),
        "{l}: the function must be outside any VPC"
    );
    assert_eq!(
        f["Environment"]["Variables"]["CACHEGATE_DYNAMODB__TABLE"],
        reference("CacheTable"),
        "{l}"
    );

    // The schema backends/dynamodb uses.
    let t = d.props("CacheTable");
    assert_eq!(d.resources["CacheTable"]["Type"], "AWS::DynamoDB::Table");
    assert_eq!(t["BillingMode"], "PAY_PER_REQUEST", "{l}");
    assert_eq!(
        t["KeySchema"],
        json!([{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}]),
        "{l}"
    );
    assert_eq!(
        t["AttributeDefinitions"],
        json!([{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "S"}]),
        "{l}"
    );
    assert_eq!(
        t["TimeToLiveSpecification"],
        json!({"AttributeName": "ttl", "Enabled": true}),
        "{l}"
    );
    assert_eq!(t["SSESpecification"]["SSEEnabled"], true, "{l}");

    // IAM: exactly the backend's actions, on this table only.
    let role = d.props("FunctionRole");
    assert!(
        role.get("ManagedPolicyArns").is_none(),
        "{l}: no managed policy without a VPC"
    );
    let statements: Vec<&Value> = role["Policies"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["PolicyDocument"]["Statement"].as_array().unwrap())
        .filter(|s| s["Action"].to_string().contains("dynamodb:"))
        .collect();
    assert_eq!(statements.len(), 1, "{l}: {statements:?}");
    let s = statements[0];
    assert_eq!(s["Effect"], "Allow");
    let actions: BTreeSet<&str> = s["Action"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(actions, BTreeSet::from(DYNAMODB_ACTIONS), "{l}");
    assert_eq!(
        s["Resource"],
        json!({"Fn::GetAtt": ["CacheTable", "Arn"]}),
        "{l}"
    );

    assert_eq!(
        d.outputs["BackendEndpoint"]["Value"],
        reference("CacheTable"),
        "{l}"
    );
}

fn check_redis(d: &Deployed) {
    let l = d.label();
    let multi = d.params["MultiAZ"] == "true";
    let azs = if multi { 2 } else { 1 };
    assert!(
        !d.resources.contains_key("CacheTable"),
        "{l}: no table with Redis"
    );
    assert_eq!(
        d.of_type("AWS::EC2::NatGateway").len(),
        azs,
        "{l}: one NAT gateway per AZ"
    );
    let privates = if multi {
        vec!["PrivateSubnetA", "PrivateSubnetB"]
    } else {
        vec!["PrivateSubnetA"]
    };
    let privates: Vec<Value> = privates.into_iter().map(reference).collect();
    assert_eq!(
        d.of_type("AWS::EC2::Subnet").len(),
        2 * azs,
        "{l}: a public and a private subnet per AZ"
    );

    // The function in the private subnets, with its own security group.
    let f = d.props("CacheFunction");
    assert_eq!(f["VpcConfig"]["SubnetIds"], json!(privates), "{l}");
    assert_eq!(
        f["VpcConfig"]["SecurityGroupIds"],
        json!([reference("FunctionSecurityGroup")]),
        "{l}"
    );
    assert_eq!(
        d.props("CacheSubnetGroup")["SubnetIds"],
        json!(privates),
        "{l}"
    );
    let role = d.props("FunctionRole");
    assert_eq!(
        role["ManagedPolicyArns"],
        json!([{"Fn::Sub": "arn:${AWS::Partition}:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole"}]),
        "{l}"
    );

    // Only the functions reach Redis: no inline ingress on the cache's
    // group, one rule on 6379 from each function's group (the proxy's and
    // the invalidator's), no CIDR anywhere.
    assert!(
        d.props("CacheSecurityGroup")
            .get("SecurityGroupIngress")
            .is_none(),
        "{l}"
    );
    let ingress = d.of_type("AWS::EC2::SecurityGroupIngress");
    let mut sources = BTreeSet::new();
    for (_, r) in &ingress {
        let rule = &r["Properties"];
        assert_eq!(rule["GroupId"], reference("CacheSecurityGroup"), "{l}");
        sources.insert(rule["SourceSecurityGroupId"].to_string());
        assert_eq!(
            (rule["FromPort"].as_i64(), rule["ToPort"].as_i64()),
            (Some(6379), Some(6379)),
            "{l}"
        );
        assert!(
            rule.get("CidrIp").is_none() && rule.get("CidrIpv6").is_none(),
            "{l}"
        );
    }
    assert_eq!(ingress.len(), 2, "{l}: {ingress:?}");
    assert_eq!(
        sources,
        BTreeSet::from([
            reference("FunctionSecurityGroup").to_string(),
            reference("InvalidatorSecurityGroup").to_string()
        ]),
        "{l}"
    );
    for (name, sg) in d.of_type("AWS::EC2::SecurityGroup") {
        assert!(
            sg["Properties"].get("SecurityGroupIngress").is_none(),
            "{l}: {name} has inline ingress"
        );
    }

    // The replication group: TLS, at-rest encryption, AUTH from the secret,
    // failover and a replica only with Multi-AZ, an LRU eviction policy.
    let c = d.props("Cache");
    assert_eq!(
        d.resources["Cache"]["Type"],
        "AWS::ElastiCache::ReplicationGroup"
    );
    assert_eq!(c["TransitEncryptionEnabled"], true, "{l}");
    assert_eq!(c["AtRestEncryptionEnabled"], true, "{l}");
    let from_secret = json!({"Fn::Sub": "{{resolve:secretsmanager:${RedisAuthToken}}}"});
    assert_eq!(c["AuthToken"], from_secret, "{l}");
    assert!(
        d.props("RedisAuthToken")["GenerateSecretString"].is_object(),
        "{l}"
    );
    assert_eq!(c["NumCacheClusters"], json!(azs), "{l}");
    assert_eq!(c["AutomaticFailoverEnabled"], json!(multi), "{l}");
    assert_eq!(c["MultiAZEnabled"], json!(multi), "{l}");
    assert_eq!(
        c["SecurityGroupIds"],
        json!([reference("CacheSecurityGroup")]),
        "{l}"
    );
    let policy = &d.props("CacheParameterGroup")["Properties"]["maxmemory-policy"];
    assert!(
        policy == "allkeys-lru" || policy == "volatile-lru",
        "{l}: {policy}"
    );

    let env = &f["Environment"]["Variables"];
    let url = json!({"Fn::Sub": "rediss://${Cache.PrimaryEndPoint.Address}:${Cache.PrimaryEndPoint.Port}"});
    assert_eq!(env["CACHEGATE_REDIS__URL"], url, "{l}");
    assert_eq!(env["CACHEGATE_REDIS__PASSWORD"], from_secret, "{l}");
    assert_eq!(d.outputs["BackendEndpoint"]["Value"], url, "{l}");
}

fn check_cloudfront(d: &Deployed) {
    let l = d.label();
    let on = d.params["EnableCloudFront"] == "true";
    let cf: Vec<_> = d
        .resources
        .iter()
        .filter(|(_, r)| r["Type"].as_str().unwrap().starts_with("AWS::CloudFront::"))
        .collect();
    assert_eq!(!cf.is_empty(), on, "{l}: CloudFront resources {cf:?}");
    assert_eq!(d.outputs.contains_key("CloudFrontUrl"), on, "{l}");
    if !on {
        return;
    }
    let c = &d.props("EdgeCachePolicy")["CachePolicyConfig"];
    assert_eq!(
        c["MinTTL"], 0,
        "{l}: private/no-store must never be cached at the edge"
    );
    assert_eq!(
        c["DefaultTTL"], 0,
        "{l}: no Cache-Control must mean no edge caching"
    );
    assert!(c["MaxTTL"].as_u64().unwrap() >= 86_400, "{l}");
    let key = &c["ParametersInCacheKeyAndForwardedToOrigin"];
    assert_eq!(
        key["QueryStringsConfig"]["QueryStringBehavior"], "all",
        "{l}"
    );
    let headers = key["HeadersConfig"]["Headers"]
        .to_string()
        .to_ascii_lowercase();
    assert!(
        !headers.contains("\"host\""),
        "{l}: Host must not reach API Gateway"
    );

    let dist = &d.props("Distribution")["DistributionConfig"];
    let behavior = &dist["DefaultCacheBehavior"];
    assert_eq!(
        behavior["CachePolicyId"],
        reference("EdgeCachePolicy"),
        "{l}"
    );
    assert_eq!(
        behavior["OriginRequestPolicyId"], ALL_VIEWER_EXCEPT_HOST,
        "{l}"
    );
    assert_eq!(behavior["CachedMethods"], json!(["GET", "HEAD"]), "{l}");
    let origin = dist["Origins"][0]["DomainName"]["Fn::Sub"]
        .as_str()
        .unwrap();
    assert!(
        origin.starts_with("${HttpApi}.execute-api."),
        "{l}: origin {origin}"
    );

    // Cache tags: the distribution reads the header the proxy writes, and
    // a response headers policy keeps it from viewers.
    let proxy_env = &d.props("CacheFunction")["Environment"]["Variables"];
    let tag_header = proxy_env["CACHEGATE_EDGE__CACHE_TAG_HEADER"]
        .as_str()
        .unwrap_or_else(|| panic!("{l}: the proxy names no cache-tag header"));
    assert_eq!(
        dist["CacheTagConfig"],
        json!({"HeaderName": tag_header}),
        "{l}"
    );
    assert_eq!(
        behavior["ResponseHeadersPolicyId"],
        reference("EdgeResponseHeadersPolicy"),
        "{l}"
    );
    assert_eq!(
        d.props("EdgeResponseHeadersPolicy")["ResponseHeadersPolicyConfig"]["RemoveHeadersConfig"],
        json!({"Items": [{"Header": tag_header}]}),
        "{l}"
    );
    // 5xx answers are not kept at the edge (CloudFront's default is 10 s).
    let errors: BTreeMap<u64, Value> = dist["CustomErrorResponses"]
        .as_array()
        .unwrap_or_else(|| panic!("{l}: no CustomErrorResponses"))
        .iter()
        .map(|e| {
            (
                e["ErrorCode"].as_u64().unwrap(),
                e["ErrorCachingMinTTL"].clone(),
            )
        })
        .collect();
    assert_eq!(
        errors,
        [500, 502, 503, 504]
            .map(|c| (c, json!(0)))
            .into_iter()
            .collect(),
        "{l}"
    );
}

/// The edge wiring: the proxy enqueues (it cannot name the distribution:
/// distribution → API → function would be a cycle), the invalidator calls
/// CloudFront on this distribution only.
fn check_edge(d: &Deployed) {
    let l = d.label();
    let on = d.params["EnableCloudFront"] == "true";
    let proxy_env = &d.props("CacheFunction")["Environment"]["Variables"];
    let invalidator_env = &d.props("InvalidatorFunction")["Environment"]["Variables"];
    let queue = on.then(|| reference("InvalidationQueue"));
    assert_eq!(
        proxy_env.get("CACHEGATE_EDGE__INVALIDATION_QUEUE_URL"),
        queue.as_ref(),
        "{l}"
    );
    assert_eq!(
        proxy_env.get("CACHEGATE_EDGE__CLOUDFRONT_DISTRIBUTION_ID"),
        None,
        "{l}"
    );
    assert_eq!(
        invalidator_env.get("CACHEGATE_EDGE__INVALIDATION_QUEUE_URL"),
        None,
        "{l}: it reads the queue"
    );
    assert_eq!(
        invalidator_env.get("CACHEGATE_EDGE__CLOUDFRONT_DISTRIBUTION_ID"),
        on.then(|| reference("Distribution")).as_ref(),
        "{l}"
    );
    // CloudFront keys only on what its cache policy names, whatever Vary
    // says: the proxy is told exactly those headers (then answers keyed on
    // others go out `private`); without CloudFront it is told nothing and
    // leaves the origin's Vary to a cache in front that honours it.
    let key_headers = proxy_env.get("CACHEGATE_EDGE__KEY_HEADERS");
    assert_eq!(key_headers.is_some(), on, "{l}: {key_headers:?}");
    if let Some(names) = key_headers {
        let names: Vec<String> = serde_json::from_str(names.as_str().unwrap()).unwrap();
        let key = &d.props("EdgeCachePolicy")["CachePolicyConfig"]
            ["ParametersInCacheKeyAndForwardedToOrigin"];
        let mut policy: Vec<String> = key["HeadersConfig"]["Headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap().to_ascii_lowercase())
            .filter(|h| h != "authorization")
            .collect();
        if key["EnableAcceptEncodingGzip"] == true || key["EnableAcceptEncodingBrotli"] == true {
            policy.push("accept-encoding".into());
        }
        policy.sort();
        let mut names: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
        names.sort();
        assert_eq!(
            names, policy,
            "{l}: edge.key_headers and the cache policy differ"
        );
    }
    for name in ["CacheFunction", "FunctionRole"] {
        let mut found = Vec::new();
        strings(&d.resources[name], String::new(), &mut found);
        let cyclic: Vec<_> = found
            .iter()
            .filter(|(_, s)| s.contains("Distribution"))
            .collect();
        assert!(
            cyclic.is_empty(),
            "{l}: {name} refers to the distribution: {cyclic:?}"
        );
    }
    let send: Vec<&Value> = d.props("FunctionRole")["Policies"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["PolicyDocument"]["Statement"].as_array().unwrap())
        .filter(|s| s["Action"] == "sqs:SendMessage")
        .collect();
    match on {
        true => assert_eq!(
            send,
            vec![&json!({"Effect": "Allow", "Action": "sqs:SendMessage",
                         "Resource": {"Fn::GetAtt": ["InvalidationQueue", "Arn"]}})],
            "{l}"
        ),
        false => assert!(send.is_empty(), "{l}: {send:?}"),
    }
}

/// The purge-only invalidator: the same build as the proxy function in
/// the `invalidator` role, fed by the bus rule and the queue, with only the
/// permissions a purge needs.
fn check_invalidator(d: &Deployed) {
    let l = d.label();
    let redis = d.params["BackendType"] == "redis";
    let f = &d.resources["InvalidatorFunction"];
    let proxy = &d.resources["CacheFunction"];
    assert_eq!(f["Type"], "AWS::Serverless::Function", "{l}");
    assert_eq!(f["Metadata"], proxy["Metadata"], "{l}: same build");
    let p = &f["Properties"];
    for same in ["CodeUri", "Handler", "Runtime", "Architectures"] {
        assert_eq!(p[same], proxy["Properties"][same], "{l}: {same}");
    }
    assert_eq!(
        p["Role"],
        json!({"Fn::GetAtt": ["InvalidatorRole", "Arn"]}),
        "{l}"
    );
    assert_eq!(
        p["LoggingConfig"]["LogGroup"],
        reference("InvalidatorLogGroup"),
        "{l}"
    );

    // The role, and the backend settings the proxy has (a URL's tag depends
    // on the upstream URL, so that too).
    let env = p["Environment"]["Variables"].as_object().unwrap();
    let proxy_env = proxy["Properties"]["Environment"]["Variables"]
        .as_object()
        .unwrap();
    assert_eq!(env["CACHEGATE_ROLE"], "invalidator", "{l}");
    for key in [
        "CACHEGATE_BACKEND",
        "CACHEGATE_UPSTREAM__URL",
        "CACHEGATE_REDIS__URL",
        "CACHEGATE_REDIS__PASSWORD",
        "CACHEGATE_DYNAMODB__TABLE",
    ] {
        assert_eq!(env.get(key), proxy_env.get(key), "{l}: {key}");
    }

    // Events: the rule on the stack's bus, and the queue with partial
    // batch responses.
    let events = p["Events"].as_object().unwrap();
    assert_eq!(events.len(), 2, "{l}: {events:?}");
    let rule = events
        .values()
        .find(|e| e["Type"] == "EventBridgeRule")
        .unwrap_or_else(|| panic!("{l}: no EventBridgeRule event"));
    assert_eq!(
        rule["Properties"]["EventBusName"],
        reference("InvalidationBus"),
        "{l}"
    );
    assert_eq!(
        d.resources["InvalidationBus"]["Type"], "AWS::Events::EventBus",
        "{l}"
    );
    let pattern = &rule["Properties"]["Pattern"];
    assert_eq!(
        pattern,
        &json!({"source": ["cachegate"], "detail-type": ["Purge"]}),
        "{l}"
    );
    let documented: Value = serde_json::from_str(
        d.outputs["InvalidationEventPattern"]["Value"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(&documented, pattern, "{l}: the output names the pattern");
    let sqs = events
        .values()
        .find(|e| e["Type"] == "SQS")
        .unwrap_or_else(|| panic!("{l}: no SQS event"));
    let queue_arn = json!({"Fn::GetAtt": ["InvalidationQueue", "Arn"]});
    let dlq_arn = json!({"Fn::GetAtt": ["InvalidationDeadLetterQueue", "Arn"]});
    assert_eq!(sqs["Properties"]["Queue"], queue_arn, "{l}");
    assert_eq!(
        sqs["Properties"]["FunctionResponseTypes"],
        json!(["ReportBatchItemFailures"]),
        "{l}"
    );

    // The queue: a dead-letter queue behind it, and a visibility timeout
    // that outlasts Lambda's handling of a batch (six times the timeout).
    let q = d.props("InvalidationQueue");
    assert_eq!(q["RedrivePolicy"]["deadLetterTargetArn"], dlq_arn, "{l}");
    assert!(
        q["RedrivePolicy"]["maxReceiveCount"].as_u64().unwrap() >= 1,
        "{l}"
    );
    let timeout = p["Timeout"].as_u64().unwrap();
    assert!(
        q["VisibilityTimeout"].as_u64().unwrap() >= 6 * timeout,
        "{l}"
    );
    for queue in ["InvalidationQueue", "InvalidationDeadLetterQueue"] {
        assert_eq!(d.props(queue)["SqsManagedSseEnabled"], true, "{l}");
    }
    // Events EventBridge failed on after Lambda's retries end up there too.
    assert_eq!(
        p["EventInvokeConfig"]["DestinationConfig"]["OnFailure"],
        json!({"Type": "SQS", "Destination": dlq_arn}),
        "{l}"
    );

    // IAM: every statement, action by resource, exactly.
    let role = d.props("InvalidatorRole");
    let mut grants: BTreeSet<(String, String)> = BTreeSet::new();
    for policy in role["Policies"].as_array().unwrap() {
        for s in policy["PolicyDocument"]["Statement"].as_array().unwrap() {
            assert_eq!(s["Effect"], "Allow", "{l}");
            let actions = match &s["Action"] {
                Value::String(a) => vec![a.clone()],
                Value::Array(a) => a.iter().map(|a| a.as_str().unwrap().to_owned()).collect(),
                other => panic!("{l}: Action {other}"),
            };
            for a in actions {
                grants.insert((a, s["Resource"].to_string()));
            }
        }
    }
    let on = |v: &Value, actions: &[&str]| -> Vec<(String, String)> {
        actions
            .iter()
            .map(|a| (a.to_string(), v.to_string()))
            .collect()
    };
    let mut want: BTreeSet<(String, String)> = BTreeSet::new();
    want.extend(on(
        &json!({"Fn::GetAtt": ["InvalidatorLogGroup", "Arn"]}),
        &["logs:CreateLogStream", "logs:PutLogEvents"],
    ));
    want.extend(on(
        &queue_arn,
        &[
            "sqs:ReceiveMessage",
            "sqs:DeleteMessage",
            "sqs:GetQueueAttributes",
        ],
    ));
    want.extend(on(&dlq_arn, &["sqs:SendMessage"]));
    let cloudfront = d.params["EnableCloudFront"] == "true";
    if cloudfront {
        want.extend(on(
            &json!({"Fn::Sub": "arn:${AWS::Partition}:cloudfront::${AWS::AccountId}:distribution/${Distribution}"}),
            &["cloudfront:CreateInvalidation"],
        ));
    }
    if !redis {
        want.extend(on(
            &json!({"Fn::GetAtt": ["CacheTable", "Arn"]}),
            &[
                "dynamodb:Query",
                "dynamodb:DeleteItem",
                "dynamodb:BatchWriteItem",
                "dynamodb:PutItem",
                "dynamodb:GetItem",
                "dynamodb:BatchGetItem",
                "dynamodb:Scan",
            ],
        ));
    }
    assert_eq!(grants, want, "{l}");

    if redis {
        assert_eq!(
            role["ManagedPolicyArns"],
            d.props("FunctionRole")["ManagedPolicyArns"],
            "{l}: the VPC execution policy"
        );
        assert_eq!(
            p["VpcConfig"]["SubnetIds"], proxy["Properties"]["VpcConfig"]["SubnetIds"],
            "{l}"
        );
        assert_eq!(
            p["VpcConfig"]["SecurityGroupIds"],
            json!([reference("InvalidatorSecurityGroup")]),
            "{l}"
        );
        // It reaches Redis and nothing else (it never calls the upstream),
        // but for the CloudFront API when there is a distribution.
        let mut egress = vec![json!({
            "Description": "Redis (TLS) only",
            "IpProtocol": "tcp",
            "FromPort": 6379,
            "ToPort": 6379,
            "DestinationSecurityGroupId": reference("CacheSecurityGroup"),
        })];
        if cloudfront {
            egress.push(json!({
                "Description": "CloudFront API (HTTPS, through the NAT)",
                "IpProtocol": "tcp",
                "FromPort": 443,
                "ToPort": 443,
                "CidrIp": "0.0.0.0/0",
            }));
        }
        assert_eq!(
            d.props("InvalidatorSecurityGroup")["SecurityGroupEgress"],
            Value::Array(egress),
            "{l}"
        );
    } else {
        assert!(role.get("ManagedPolicyArns").is_none(), "{l}");
        assert!(p.get("VpcConfig").is_none(), "{l}: outside any VPC");
    }

    // What publishers may do: put on this bus, send to this queue.
    let publisher = &d.props("InvalidationPublisherPolicy")["PolicyDocument"]["Statement"];
    assert_eq!(
        publisher,
        &json!([
            {"Effect": "Allow", "Action": "events:PutEvents",
             "Resource": {"Fn::GetAtt": ["InvalidationBus", "Arn"]}},
            {"Effect": "Allow", "Action": "sqs:SendMessage", "Resource": queue_arn},
        ]),
        "{l}"
    );

    assert_eq!(
        d.outputs["InvalidationQueueUrl"]["Value"],
        reference("InvalidationQueue"),
        "{l}"
    );
    for output in [
        "InvalidationDeadLetterQueueUrl",
        "InvalidationEventBusName",
        "InvalidationPublisherPolicyArn",
        "InvalidatorFunctionName",
    ] {
        assert!(d.outputs.contains_key(output), "{l}: output {output}");
    }
}

#[test]
fn each_parameter_choice_deploys_what_the_proxy_needs() {
    let template = template_json();
    for backend in ["redis", "dynamodb"] {
        for multi_az in ["true", "false"] {
            for (cloudfront, ttl) in [("true", "60"), ("false", "0")] {
                let d = deploy(
                    &template,
                    &[
                        ("BackendType", backend),
                        ("MultiAZ", multi_az),
                        ("EnableCloudFront", cloudfront),
                        ("DefaultTtl", ttl),
                        ("UpstreamUrl", "https://api.example.com/v1"),
                    ],
                );
                check_common(&d);
                if backend == "redis" {
                    check_redis(&d);
                } else {
                    check_dynamodb(&d);
                }
                check_cloudfront(&d);
                check_edge(&d);
                check_invalidator(&d);
            }
        }
    }
}

#[test]
fn template_defaults_are_the_cheap_safe_ones() {
    let template = template_json();
    let p = &template["Parameters"];
    // Nothing billed hourly unless asked for; arm64 as the issue asks.
    assert_eq!(p["BackendType"]["Default"], "dynamodb");
    assert_eq!(p["MultiAZ"]["Default"], "false");
    assert_eq!(p["EnableCloudFront"]["Default"], "false");
    assert_eq!(p["Architecture"]["Default"], "arm64");
    assert_eq!(
        p["Architecture"]["AllowedValues"],
        json!(["arm64", "x86_64"])
    );
    assert_eq!(
        p["BackendType"]["AllowedValues"],
        json!(["redis", "dynamodb"])
    );
    // No default upstream: `sam deploy --guided` asks for it.
    assert!(p["UpstreamUrl"].get("Default").is_none());
}

/// `UpstreamCredentialSecretArn`: the proxy function gets the secret as
/// its own upstream credential (`upstream.headers`, a TOML inline table
/// in the environment) and may read that secret and no other; the
/// invalidator never calls the upstream and gets nothing. Unset: neither.
#[test]
fn an_upstream_credential_secret_is_the_proxys_alone() {
    let template = template_json();
    let arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:weather-api-AbCdEf";
    let grants = |d: &Deployed, role: &str| -> Vec<Value> {
        d.props(role)["Policies"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p["PolicyDocument"]["Statement"].as_array().unwrap())
            .filter(|s| s["Action"].to_string().contains("secretsmanager:"))
            .cloned()
            .collect()
    };
    for (field, header) in [("", "x-api-key"), ("key", "Authorization")] {
        let d = deploy(
            &template,
            &[
                ("UpstreamUrl", "https://api.example.com/v1"),
                ("UpstreamCredentialSecretArn", arn),
                ("UpstreamCredentialSecretField", field),
                ("UpstreamCredentialHeader", header),
            ],
        );
        let env = d.props("CacheFunction")["Environment"]["Variables"]
            .as_object()
            .unwrap();
        let sub = env["CACHEGATE_UPSTREAM__HEADERS"]["Fn::Sub"]
            .as_str()
            .unwrap();
        let want = if field.is_empty() {
            "{${UpstreamCredentialHeader}=\"secretsmanager:${UpstreamCredentialSecretArn}\"}"
        } else {
            "{${UpstreamCredentialHeader}=\"secretsmanager:${UpstreamCredentialSecretArn}#${UpstreamCredentialSecretField}\"}"
        };
        assert_eq!(sub, want);
        assert_eq!(
            grants(&d, "FunctionRole"),
            vec![
                json!({"Effect": "Allow", "Action": "secretsmanager:GetSecretValue",
                        "Resource": {"Ref": "UpstreamCredentialSecretArn"}})
            ]
        );
        assert!(grants(&d, "InvalidatorRole").is_empty());
        // What CloudFormation substitutes is a configuration the proxy takes.
        let value = sub
            .replace("${UpstreamCredentialHeader}", header)
            .replace("${UpstreamCredentialSecretArn}", arn)
            .replace("${UpstreamCredentialSecretField}", field);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cachegate"))
            .args(["--config", "/dev/null", "config"])
            .env("CACHEGATE_UPSTREAM__URL", "https://api.example.com/v1")
            .env("CACHEGATE_UPSTREAM__HEADERS", &value)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(
            printed.contains(&format!("secretsmanager:{arn}")),
            "{printed}"
        );
    }
    let d = deploy(&template, &[("UpstreamUrl", "https://api.example.com/v1")]);
    let env = d.props("CacheFunction")["Environment"]["Variables"]
        .as_object()
        .unwrap();
    assert!(!env.contains_key("CACHEGATE_UPSTREAM__HEADERS"));
    assert!(grants(&d, "FunctionRole").is_empty());
}

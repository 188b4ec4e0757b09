//! One invocation of the plugin, as the runtime makes it: environment
//! variables plus the network configuration on stdin; a result or error
//! JSON on stdout and the exit status.

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::spec::{self, CniError, ErrorCode, NetConf};
use crate::wire::{self, Command, Request};

/// The CNI_* environment of one invocation.
#[derive(Clone, Debug, Default)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
}

impl Env {
    pub fn from_process() -> Env {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        Env {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
        }
    }
}

/// What to print on stdout (nothing for a silent success) and the exit code.
pub struct Outcome {
    pub stdout: Option<Value>,
    pub exit_code: i32,
}

/// Run one invocation.
pub fn run(env: &Env, stdin: &[u8]) -> Outcome {
    // VERSION needs no valid configuration beyond its cniVersion.
    if env.command == "VERSION" {
        let asked = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
            .filter(|v| spec::version_supported(v))
            .unwrap_or_else(|| spec::SUPPORTED_VERSIONS[spec::SUPPORTED_VERSIONS.len() - 1].into());
        return Outcome {
            stdout: Some(
                json!({"cniVersion": asked, "supportedVersions": spec::SUPPORTED_VERSIONS}),
            ),
            exit_code: 0,
        };
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => {
            return failure(
                &e,
                spec::SUPPORTED_VERSIONS[spec::SUPPORTED_VERSIONS.len() - 1],
            );
        }
    };
    let version = conf.version().to_string();
    match invoke(env, &conf) {
        Ok(Some(mut result)) => {
            if let Value::Object(map) = &mut result {
                map.insert("cniVersion".into(), Value::String(version));
            }
            Outcome {
                stdout: Some(result),
                exit_code: 0,
            }
        }
        Ok(None) => Outcome {
            stdout: None,
            exit_code: 0,
        },
        Err(e) => failure(&e, &version),
    }
}

fn failure(e: &CniError, version: &str) -> Outcome {
    Outcome {
        stdout: Some(e.to_json(version)),
        exit_code: 1,
    }
}

fn invoke(env: &Env, conf: &NetConf) -> Result<Option<Value>, CniError> {
    if !spec::version_supported(conf.version()) {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!(
                "cniVersion {:?} is not supported (supported: {})",
                conf.cni_version,
                spec::SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    let command = match env.command.as_str() {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        "GC" => Command::Gc,
        "STATUS" => Command::Status,
        "" => return Err(missing("CNI_COMMAND")),
        other => {
            return Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("CNI_COMMAND: unknown command {other:?}"),
            ));
        }
    };
    let needs_container = matches!(command, Command::Add | Command::Del | Command::Check);
    if needs_container {
        if env.container_id.is_empty() {
            return Err(missing("CNI_CONTAINERID"));
        }
        if env.ifname.is_empty() {
            return Err(missing("CNI_IFNAME"));
        }
        // DEL may come after the namespace is gone; ADD and CHECK need it.
        if command != Command::Del && env.netns.is_empty() {
            return Err(missing("CNI_NETNS"));
        }
    }
    if command == Command::Check && conf.prev_result.is_none() {
        return Err(CniError::new(
            ErrorCode::InvalidConfig,
            "prevResult: required for CHECK",
        ));
    }
    let (pod_namespace, pod_name) = spec::pod_from_args(&env.args);
    let req = Request {
        command: Some(command),
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        ifname: env.ifname.clone(),
        pod_namespace,
        pod_name,
        mtu: conf.mtu.filter(|m| *m != 0),
        network: conf.name.clone(),
        prev_result: conf.prev_result.clone(),
        valid_attachments: conf.valid_attachments.clone().unwrap_or_default(),
    };
    let socket = PathBuf::from(conf.socket.as_deref().unwrap_or(spec::DEFAULT_SOCKET));
    let result = wire::call(&socket, &req)?;
    Ok((command == Command::Add).then_some(result))
}

fn missing(var: &str) -> CniError {
    CniError::new(
        ErrorCode::InvalidEnvironment,
        format!("{var}: required environment variable is missing"),
    )
}

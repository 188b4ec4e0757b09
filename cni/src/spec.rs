//! Facts from the CNI specification: versions, error codes, the network
//! configuration this plugin reads and the error JSON it prints.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The versions this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0", "1.1.0"];

/// The plugin's `type` in a network configuration.
pub const PLUGIN_TYPE: &str = "membrane";

/// Default agent socket (as `membrane up` / the agent serve it).
pub const DEFAULT_SOCKET: &str = "/var/run/membrane/cni.sock";

/// The spec's well-known error codes (SPEC.md "Error").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
pub enum ErrorCode {
    IncompatibleVersion,
    UnsupportedField,
    ContainerUnknown,
    InvalidEnvironment,
    Io,
    Decode,
    InvalidConfig,
    TryAgainLater,
    /// STATUS: the plugin cannot service ADD requests.
    NotAvailable,
    /// STATUS: not available, and existing containers may have limited
    /// connectivity.
    NotAvailableLimited,
    /// Plugin-specific codes are 100 and above.
    Plugin(u32),
}

impl From<ErrorCode> for u32 {
    fn from(c: ErrorCode) -> u32 {
        match c {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::UnsupportedField => 2,
            ErrorCode::ContainerUnknown => 3,
            ErrorCode::InvalidEnvironment => 4,
            ErrorCode::Io => 5,
            ErrorCode::Decode => 6,
            ErrorCode::InvalidConfig => 7,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::NotAvailable => 50,
            ErrorCode::NotAvailableLimited => 51,
            ErrorCode::Plugin(n) => n,
        }
    }
}

impl TryFrom<u32> for ErrorCode {
    type Error = String;
    fn try_from(n: u32) -> Result<Self, String> {
        Ok(match n {
            1 => ErrorCode::IncompatibleVersion,
            2 => ErrorCode::UnsupportedField,
            3 => ErrorCode::ContainerUnknown,
            4 => ErrorCode::InvalidEnvironment,
            5 => ErrorCode::Io,
            6 => ErrorCode::Decode,
            7 => ErrorCode::InvalidConfig,
            11 => ErrorCode::TryAgainLater,
            50 => ErrorCode::NotAvailable,
            51 => ErrorCode::NotAvailableLimited,
            n if n >= 100 => ErrorCode::Plugin(n),
            n => return Err(format!("{n} is not a CNI error code")),
        })
    }
}

/// Plugin-specific: the address pool has no free address.
pub const CODE_POOL_EXHAUSTED: u32 = 100;
/// Plugin-specific: the kernel refused a change (netlink).
pub const CODE_KERNEL: u32 = 101;
/// Plugin-specific: CHECK found the container's network differs.
pub const CODE_CHECK_FAILED: u32 = 102;

/// An error as the spec prints it: `{cniVersion, code, msg, details}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("CNI error {}: {msg}{}", u32::from(*.code), if .details.is_empty() { String::new() } else { format!(" ({})", .details) })]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }
    pub fn details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }
    /// The JSON printed on stdout.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = serde_json::json!({
            "cniVersion": cni_version,
            "code": u32::from(self.code),
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

/// One `cni.dev/valid-attachments` entry of a GC request.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The parts of the network configuration this plugin reads. Other fields
/// (runtimeConfig, args, capabilities ...) are ignored, as the spec allows.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// The agent's CNI socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// MTU of the pod interface and its host side (0 or absent: the agent's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(
        rename = "prevResult",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub prev_result: Option<Value>,
    #[serde(
        rename = "cni.dev/valid-attachments",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_attachments: Option<Vec<Attachment>>,
}

impl NetConf {
    /// Parses stdin; fails with code 6 (decode) or 7 (invalid config),
    /// naming the field.
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(ErrorCode::Decode, "network configuration is not valid JSON")
                .details(e.to_string())
        })?;
        let conf: NetConf = serde_path_to_error::deserialize(v).map_err(|e| {
            CniError::new(
                ErrorCode::InvalidConfig,
                format!("invalid network configuration: {}", e.path()),
            )
            .details(format!("{}: {}", e.path(), e.inner()))
        })?;
        if conf.plugin_type != PLUGIN_TYPE {
            return Err(CniError::new(
                ErrorCode::InvalidConfig,
                format!(
                    "type: expected {PLUGIN_TYPE:?}, found {:?}",
                    conf.plugin_type
                ),
            ));
        }
        if conf
            .mtu
            .is_some_and(|m| m != 0 && !(576..=65535).contains(&m))
        {
            return Err(CniError::new(
                ErrorCode::InvalidConfig,
                format!("mtu: {} is outside 576..65535", conf.mtu.unwrap_or(0)),
            ));
        }
        Ok(conf)
    }

    /// The version to answer in: the configuration's, or the newest.
    pub fn version(&self) -> &str {
        if self.cni_version.is_empty() {
            SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1]
        } else {
            &self.cni_version
        }
    }
}

/// Whether `v` is one this plugin speaks.
pub fn version_supported(v: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&v)
}

/// `K8S_POD_NAMESPACE` / `K8S_POD_NAME` from `CNI_ARGS` (`K=V;K=V`); the
/// namespace is `default` when absent, as the kubelet would set it.
pub fn pod_from_args(args: &str) -> (String, String) {
    let mut namespace = String::new();
    let mut name = String::new();
    for pair in args.split(';') {
        if let Some((k, v)) = pair.split_once('=') {
            match k.trim() {
                "K8S_POD_NAMESPACE" => namespace = v.trim().to_string(),
                "K8S_POD_NAME" => name = v.trim().to_string(),
                _ => {}
            }
        }
    }
    if namespace.is_empty() {
        namespace = "default".into();
    }
    (namespace, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_args_default_namespace() {
        assert_eq!(
            pod_from_args("IgnoreUnknown=1;K8S_POD_NAME=web"),
            ("default".into(), "web".into())
        );
        assert_eq!(
            pod_from_args("K8S_POD_NAMESPACE=prod;K8S_POD_NAME=db;K8S_POD_INFRA_CONTAINER_ID=x"),
            ("prod".into(), "db".into())
        );
    }

    #[test]
    fn error_json_has_spec_shape() {
        let e = CniError::new(ErrorCode::TryAgainLater, "agent unreachable").details("x");
        assert_eq!(
            e.to_json("1.0.0"),
            serde_json::json!({"cniVersion": "1.0.0", "code": 11, "msg": "agent unreachable", "details": "x"})
        );
    }

    #[test]
    fn conf_names_bad_field() {
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#)
            .expect_err("wrong type");
        assert_eq!(e.code, ErrorCode::InvalidConfig);
        assert!(e.msg.starts_with("type:"), "{}", e.msg);
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","type":"membrane","mtu":"x"}"#)
            .expect_err("bad mtu");
        assert!(e.details.contains("mtu"), "{e}");
        let e = NetConf::parse(b"{").expect_err("not json");
        assert_eq!(e.code, ErrorCode::Decode);
    }
}

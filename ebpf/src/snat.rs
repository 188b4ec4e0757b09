//! NodePort to a backend on another node: the devices through which a
//! flow enters and leaves the node (its underlay device, the tunnel
//! device), each with the address a flow leaving through it is SNATed to
//! (`lb_snat_dev`, read by `nodeport_snat` in `bpf/lb.c`). The map is
//! pinned next to the others, so it is opened from its pin and the loaded
//! program sees every change at once.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use aya::maps::{Array, HashMap, Map, MapData};

use crate::datapath::DatapathError;
use crate::maps::{CFG_SNAT_DEVS, MAP_CONFIG, RnatValue};

pub const MAP_SNAT_DEV: &str = "lb_snat_dev";

fn addr16(ip: IpAddr) -> [u8; 16] {
    let mut a = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => a[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => a = v6.octets(),
    }
    a
}

/// Make `lb_snat_dev` hold exactly `devices` (ifindex → SNAT address;
/// flows of the address's family only).
pub fn set_snat_devices(
    pin_dir: &Path,
    devices: &BTreeMap<u32, IpAddr>,
) -> Result<(), DatapathError> {
    let map_err = |source| DatapathError::Map {
        map: MAP_SNAT_DEV,
        source,
    };
    let data = MapData::from_pin(pin_dir.join(MAP_SNAT_DEV)).map_err(map_err)?;
    let mut map: HashMap<MapData, u32, RnatValue> =
        HashMap::try_from(Map::HashMap(data)).map_err(map_err)?;
    let stale: Vec<u32> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !devices.contains_key(k))
        .collect();
    for k in stale {
        map.remove(&k).map_err(map_err)?;
    }
    for (ifindex, ip) in devices {
        // `port` carries the family: `nodeport_snat` SNATs only flows of it.
        let family = if ip.is_ipv4() { 4 } else { 6 };
        let v = RnatValue {
            addr: addr16(*ip),
            port: family,
            pad: [0; 2],
        };
        map.insert(ifindex, v, 0).map_err(map_err)?;
    }
    // The program looks devices up only while there are some.
    let n = u32::try_from(devices.len()).unwrap_or(u32::MAX);
    set_config(pin_dir, CFG_SNAT_DEVS, n)
}

/// Writes one `lb_config` count through its pin.
pub(crate) fn set_config(pin_dir: &Path, idx: u32, value: u32) -> Result<(), DatapathError> {
    let map_err = |source| DatapathError::Map {
        map: MAP_CONFIG,
        source,
    };
    let data = MapData::from_pin(pin_dir.join(MAP_CONFIG)).map_err(map_err)?;
    let mut cfg: Array<MapData, u32> = Array::try_from(Map::Array(data)).map_err(map_err)?;
    cfg.set(idx, value, 0).map_err(map_err)
}

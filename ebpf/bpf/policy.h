/* Policy map layouts shared with Rust (ebpf/src/policy_maps.rs). Padded
 * explicitly so C and #[repr(C)] agree byte for byte. */
#ifndef MEMBRANE_POLICY_H
#define MEMBRANE_POLICY_H

#include <linux/types.h>

#define POL_DIR_INGRESS 0
#define POL_DIR_EGRESS 1

#define POL_FAMILY_V4 4
#define POL_FAMILY_V6 6

/* Reserved identities (Cilium's numbers) the datapath uses itself. */
#define POL_ID_ANY 0
#define POL_ID_WORLD_IPV4 9
#define POL_ID_WORLD_IPV6 10

/* pol_endpoint.flags */
#define POL_F_INGRESS_DEFAULT_DENY 1
#define POL_F_EGRESS_DEFAULT_DENY 2
/* Any entry or enforcement at all; without it the endpoint is skipped. */
#define POL_F_HAS_POLICY 4

/* Indices of pol_stats: verdict counters and drop reasons. */
#define POL_STAT_ALLOW_POLICY 0
#define POL_STAT_ALLOW_REPLY 1
#define POL_STAT_ALLOW_NOT_ENFORCED 2
#define POL_STAT_ALLOW_ND 3
#define POL_STAT_DROP_POLICY_DENY 4   /* an explicit deny rule (Cilium 181) */
#define POL_STAT_DROP_DEFAULT_DENY 5  /* no rule allows it (Cilium 133) */
#define POL_STAT_DROP_MALFORMED 6
#define POL_STAT_FRAGMENT_PASSED 7
#define POL_STAT_CT_CREATED 8
#define POL_STAT_ALLOW_RELATED 9    /* ICMP error about an allowed flow */
#define POL_STAT_MAX 16

/* ipcache: LPM over family + address. prefixlen counts the 32 bits of
 * family/pad, then address bits. */
struct pol_ipcache_key {
	__u32 prefixlen;
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};

struct pol_ipcache_value {
	__u32 identity;
	__u32 pad;
};

/* Policy entry: (endpoint, peer identity, direction) is always matched in
 * full (72 bits); protocol and port follow as a 24-bit prefix, so one entry
 * covers "every protocol", "every TCP port" or an aligned port block. */
struct pol_key {
	__u32 prefixlen;
	__be32 ep_id;
	__be32 identity;
	__u8 direction;
	__u8 proto;
	__be16 dport; /* ICMP: the type */
};

#define POL_KEY_FIXED_BITS 72
#define POL_KEY_FULL_BITS 96

struct pol_value {
	__u8 deny;
	__u8 pad[7];
	__u64 packets;
};

/* Endpoint of a host-side device, keyed by ifindex. */
struct pol_endpoint {
	__u32 ep_id;
	__u32 identity;
	__u32 flags;
	__u32 pad;
};

/* A connection allowed by `direction` of endpoint `ep_id`, keyed by the
 * tuple of the packet that was allowed. Replies are matched against the
 * reversed tuple. */
struct pol_ct_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u32 ep_id;
	__u8 proto;
	__u8 family;
	__u8 direction;
	__u8 pad;
};

#define POL_CT_F_ICMP_ECHO 1

struct pol_ct_value {
	__u64 last_seen;
	__u32 flags;
	__u32 pad;
};

_Static_assert(sizeof(struct pol_ipcache_key) == 24, "pol_ipcache_key");
_Static_assert(sizeof(struct pol_key) == 16, "pol_key");
_Static_assert(sizeof(struct pol_value) == 16, "pol_value");
_Static_assert(sizeof(struct pol_endpoint) == 16, "pol_endpoint");
_Static_assert(sizeof(struct pol_ct_key) == 44, "pol_ct_key");
_Static_assert(sizeof(struct pol_ct_value) == 16, "pol_ct_value");

#endif

/* Map layouts shared with Rust (ebpf/src/maps.rs). Every struct is padded
 * explicitly so C and #[repr(C)] agree byte for byte; a Rust test compares
 * these against the BTF of the compiled object. */
#ifndef MEMBRANE_LB_H
#define MEMBRANE_LB_H

#include <linux/types.h>

#define LB_FAMILY_V4 4
#define LB_FAMILY_V6 6

#define LB_ALG_RANDOM 0
#define LB_ALG_MAGLEV 1

#define LB_BACKEND_ACTIVE 0
#define LB_BACKEND_TERMINATING 1
#define LB_BACKEND_QUARANTINED 2
#define LB_BACKEND_MAINTENANCE 3

/* Indices of lb_stats. */
#define LB_STAT_FWD_NEW 0
#define LB_STAT_FWD_ESTABLISHED 1
#define LB_STAT_REV_NAT 2
#define LB_STAT_DROP_NO_BACKEND 3
#define LB_STAT_DROP_BACKEND_MISSING 4
#define LB_STAT_DROP_REWRITE 5
#define LB_STAT_DROP_MALFORMED 6
#define LB_STAT_AFFINITY_HIT 7
#define LB_STAT_RESELECT 8
#define LB_STAT_REDIRECT 9
#define LB_STAT_DROP_NO_LISTENER 10
/* eBPF host routing: delivered to a local endpoint with bpf_redirect_peer,
 * through its host-side device's egress hook with bpf_redirect, or to the
 * FIB's next hop with bpf_redirect_neigh. */
#define LB_STAT_HOST_ROUTE_PEER 11
#define LB_STAT_HOST_ROUTE_EGRESS 12
#define LB_STAT_HOST_ROUTE_FIB 13
/* Socket LB (sock.c): connect/sendmsg translated to a backend, and
 * recvmsg/getpeername translated back to the service. */
#define LB_STAT_SOCK_TRANSLATE 14
#define LB_STAT_SOCK_REV 15
#define LB_STAT_MAX 16

/* Indices of lb_config: counts the loader keeps so the per-packet path
 * skips a map whose lookup cannot hit. */
/* Entries in lb_redirect (frontends delivered to a local proxy). */
#define LB_CFG_REDIRECTS 0
/* Entries in lb_snat_dev (NodePort SNAT devices). */
#define LB_CFG_SNAT_DEVS 1
#define LB_CFG_MAX 2

/* Packets handed to a local proxy socket carry this mark (under
 * LB_PROXY_MARK_MASK); the agent routes marked packets to the local table
 * so they are delivered instead of forwarded. */
#define LB_PROXY_MARK 0x0e00
#define LB_PROXY_MARK_MASK 0x0f00

/* A frontend: address (IPv4 in the first 4 bytes), port in network order. */
struct lb_svc_key {
	__u8 addr[16];
	__be16 port;
	__u8 proto;
	__u8 family;
};

struct lb_svc_value {
	__u32 svc_id;
	/* Random: number of slots in lb_slots. Maglev: number of backends in
	 * the table (0 = no backend, drop). */
	__u32 count;
	/* ClientIP affinity timeout in seconds; 0 = no affinity. */
	__u32 affinity_timeout;
	__u8 algorithm;
	__u8 flags;
	__u16 pad;
};

struct lb_slot_key {
	__u32 svc_id;
	__u32 slot;
};

struct lb_backend {
	__u8 addr[16];
	__be16 port;
	__u8 proto;
	__u8 family;
	__u8 state;
	__u8 pad[3];
};

/* A 5-tuple as seen on the wire; conntrack (client -> frontend) and reverse
 * NAT (backend -> client) keys. */
struct lb_tuple {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u8 pad[2];
};

struct lb_ct_value {
	__u32 backend_id;
	__u32 svc_id;
	__u64 last_seen;
};

struct lb_rnat_value {
	__u8 addr[16];
	__be16 port;
	__u8 pad[2];
};

struct lb_affinity_key {
	__u8 addr[16];
	__u32 svc_id;
	__u8 family;
	__u8 pad[3];
};

struct lb_affinity_value {
	__u32 backend_id;
	__u32 pad;
	__u64 last_seen;
};

/* A local endpoint (pod address) for eBPF host routing. */
struct lb_ep_key {
	__u8 addr[16];
	__u8 family;
	__u8 pad[3];
};

/* Deliver through the host-side device's egress hook (bpf_redirect) instead
 * of straight into the pod (bpf_redirect_peer): set when a program on that
 * hook (policy) must see the pod's ingress traffic. */
#define LB_EP_F_EGRESS_HOOK 1

struct lb_ep_value {
	/* Host-side (lxc) device of the endpoint. */
	__u32 ifindex;
	__u32 flags;
	/* The pod's MAC and the host side's, written into the frame on
	 * delivery (all zero: left as they are). */
	__u8 mac[6];
	__u8 node_mac[6];
};

/* Socket LB reverse translation: socket cookie + the backend it was sent
 * to -> the service address the application asked for. */
struct lb_sock_rev_key {
	__u64 cookie;
	__u8 addr[16];
	__be16 port;
	__u8 family;
	__u8 pad[5];
};

#endif

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Membrane L3/L4 policy enforcement on the host side of a pod's veth.
 *
 * tc ingress of the device sees what the pod sends (its egress policy),
 * tc egress sees what the pod receives (its ingress policy). The peer's
 * identity comes from the ipcache (LPM); the decision from the policy LPM
 * trie, looked up for the peer's identity and for ANY: a deny in either
 * wins, then an allow in either, then the direction's default. Replies of
 * connections this endpoint's policy allowed are admitted through a
 * conntrack entry made by the allowing direction — only packets that are
 * replies (no bare SYN, ICMP echo replies only) qualify. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <stddef.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "policy.h"

/* Allowed packets go on to the next program of the hook (the service
 * load balancer at tc ingress), or the stack if there is none. */
#define TCX_NEXT TC_ACT_UNSPEC

/* How long after its last packet a tracked flow still admits replies (set
 * by the loader; Cilium's defaults: 6 h for TCP, 60 s otherwise). */
volatile const __u64 CT_TIMEOUT_TCP_NS = 21600ULL * 1000000000ULL;
volatile const __u64 CT_TIMEOUT_OTHER_NS = 60ULL * 1000000000ULL;

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1048576);
	__type(key, struct pol_ipcache_key);
	__type(value, struct pol_ipcache_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pol_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4194304);
	__type(key, struct pol_key);
	__type(value, struct pol_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pol_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct pol_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pol_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct pol_ct_key);
	__type(value, struct pol_ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pol_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, POL_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pol_stats SEC(".maps");

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&pol_stats, &idx);
	if (v)
		__sync_fetch_and_add(v, 1);
}

#define IPPROTO_ICMPV6_ 58
#define ICMP_ECHO_REQUEST 8
#define ICMP_ECHO_REPLY 0
#define ICMP6_ECHO_REQUEST 128
#define ICMP6_ECHO_REPLY 129
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10

struct flow {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 is_icmp;
	__u8 later_fragment;
	__u8 icmp_error;
	__u8 pad[3];
	__u32 l4_off;
};

/* 0: parsed; 1: not IP (left alone); -1: truncated. */
static __always_inline int parse(struct __sk_buff *skb, struct flow *f)
{
	struct ethhdr eth;
	__u32 l4_off;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return 1;
	if (eth.h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, sizeof(eth), &ip, sizeof(ip)) < 0)
			return -1;
		if (ip.ihl < 5)
			return -1;
		__builtin_memcpy(f->saddr, &ip.saddr, 4);
		__builtin_memcpy(f->daddr, &ip.daddr, 4);
		f->family = POL_FAMILY_V4;
		f->proto = ip.protocol;
		if (ip.frag_off & bpf_htons(0x1fff)) {
			f->later_fragment = 1;
			return 0;
		}
		l4_off = sizeof(eth) + ip.ihl * 4;
	} else if (eth.h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, sizeof(eth), &ip6, sizeof(ip6)) < 0)
			return -1;
		__builtin_memcpy(f->saddr, &ip6.saddr, 16);
		__builtin_memcpy(f->daddr, &ip6.daddr, 16);
		f->family = POL_FAMILY_V6;
		/* Extension headers are not walked: the next header is the
		 * protocol the policy sees. */
		f->proto = ip6.nexthdr;
		l4_off = sizeof(eth) + sizeof(ip6);
	} else {
		return 1;
	}
	if (f->proto == IPPROTO_TCP || f->proto == IPPROTO_UDP || f->proto == IPPROTO_SCTP) {
		__be16 ports[2];
		if (bpf_skb_load_bytes(skb, l4_off, ports, sizeof(ports)) < 0)
			return -1;
		f->sport = ports[0];
		f->dport = ports[1];
		if (f->proto == IPPROTO_TCP &&
		    bpf_skb_load_bytes(skb, l4_off + 13, &f->tcp_flags, 1) < 0)
			return -1;
	} else if (f->proto == IPPROTO_ICMP || f->proto == IPPROTO_ICMPV6_) {
		__u8 hdr[8];
		if (bpf_skb_load_bytes(skb, l4_off, hdr, sizeof(hdr)) < 0)
			return -1;
		f->is_icmp = 1;
		f->icmp_type = hdr[0];
		f->l4_off = l4_off;
		f->icmp_error = f->family == POL_FAMILY_V4
					? (hdr[0] == 3 || hdr[0] == 11 || hdr[0] == 12)
					: (hdr[0] >= 1 && hdr[0] <= 4);
		int echo = f->family == POL_FAMILY_V4
				   ? (hdr[0] == ICMP_ECHO_REQUEST || hdr[0] == ICMP_ECHO_REPLY)
				   : (hdr[0] == ICMP6_ECHO_REQUEST || hdr[0] == ICMP6_ECHO_REPLY);
		if (echo) {
			/* The echo identifier plays both ports. */
			__builtin_memcpy(&f->sport, &hdr[4], 2);
			f->dport = f->sport;
		}
	}
	return 0;
}

static __always_inline int is_echo_request(const struct flow *f)
{
	return f->is_icmp && (f->icmp_type == ICMP_ECHO_REQUEST ||
			      f->icmp_type == ICMP6_ECHO_REQUEST);
}

static __always_inline int is_echo_reply(const struct flow *f)
{
	return f->is_icmp && (f->family == POL_FAMILY_V4 ? f->icmp_type == ICMP_ECHO_REPLY
							 : f->icmp_type == ICMP6_ECHO_REPLY);
}

static __always_inline __u32 peer_identity(const struct flow *f, __u8 dir)
{
	struct pol_ipcache_key k = {};
	k.family = f->family;
	if (dir == POL_DIR_EGRESS)
		__builtin_memcpy(k.addr, f->daddr, 16);
	else
		__builtin_memcpy(k.addr, f->saddr, 16);
	k.prefixlen = 32 + (f->family == POL_FAMILY_V4 ? 32 : 128);
	struct pol_ipcache_value *v = bpf_map_lookup_elem(&pol_ipcache, &k);
	if (v)
		return v->identity;
	return f->family == POL_FAMILY_V4 ? POL_ID_WORLD_IPV4 : POL_ID_WORLD_IPV6;
}

/* -1: no entry; 0: allow; 1: deny. Counts the packet on the entry. */
static __always_inline int policy_lookup(__u32 ep_id, __u32 identity, __u8 dir,
					 __u8 proto, __be16 dport)
{
	struct pol_key k = {
		.prefixlen = POL_KEY_FULL_BITS,
		.ep_id = bpf_htonl(ep_id),
		.identity = bpf_htonl(identity),
		.direction = dir,
		.proto = proto,
		.dport = dport,
	};
	struct pol_value *v = bpf_map_lookup_elem(&pol_policy, &k);
	if (!v)
		return -1;
	__sync_fetch_and_add(&v->packets, 1);
	return v->deny ? 1 : 0;
}

static __always_inline void ct_key(struct pol_ct_key *k, const struct flow *f,
				   __u32 ep_id, __u8 dir, int reversed)
{
	if (reversed) {
		__builtin_memcpy(k->saddr, f->daddr, 16);
		__builtin_memcpy(k->daddr, f->saddr, 16);
		k->sport = f->dport;
		k->dport = f->sport;
	} else {
		__builtin_memcpy(k->saddr, f->saddr, 16);
		__builtin_memcpy(k->daddr, f->daddr, 16);
		k->sport = f->sport;
		k->dport = f->dport;
	}
	k->ep_id = ep_id;
	k->proto = f->proto;
	k->family = f->family;
	k->direction = dir;
}

/* Is this packet a reply of a connection the other direction allowed? */
static __always_inline int is_reply(const struct flow *f, __u32 ep_id, __u8 dir)
{
	struct pol_ct_key k = {};

	if (f->proto == IPPROTO_TCP &&
	    (f->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
		return 0; /* a new connection is never a reply */
	if (f->is_icmp && !is_echo_reply(f))
		return 0; /* an echo request reusing an ID is not a reply */
	ct_key(&k, f, ep_id, dir == POL_DIR_INGRESS ? POL_DIR_EGRESS : POL_DIR_INGRESS, 1);
	struct pol_ct_value *v = bpf_map_lookup_elem(&pol_ct, &k);
	if (!v)
		return 0;
	if (f->is_icmp && !(v->flags & POL_CT_F_ICMP_ECHO))
		return 0;
	__u64 now = bpf_ktime_get_ns();
	__u64 timeout = f->proto == IPPROTO_TCP ? CT_TIMEOUT_TCP_NS : CT_TIMEOUT_OTHER_NS;
	if (now - v->last_seen > timeout)
		return 0; /* expired: judged by policy, and re-tracked if allowed */
	v->last_seen = now;
	return 1;
}

/* Is this ICMP error about a flow this endpoint's policy allowed? The
 * error quotes the offending packet's header: a packet of a tracked flow
 * (sent by the endpoint, or its reply). */
static __always_inline int is_related(struct __sk_buff *skb, const struct flow *f,
				      __u32 ep_id, __u8 dir)
{
	struct flow in = {};
	__u32 off = f->l4_off + 8;
	__u32 in_l4;

	if (f->family == POL_FAMILY_V4) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0 || ip.ihl < 5)
			return 0;
		__builtin_memcpy(in.saddr, &ip.saddr, 4);
		__builtin_memcpy(in.daddr, &ip.daddr, 4);
		in.proto = ip.protocol;
		in_l4 = off + ip.ihl * 4;
	} else {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
			return 0;
		__builtin_memcpy(in.saddr, &ip6.saddr, 16);
		__builtin_memcpy(in.daddr, &ip6.daddr, 16);
		in.proto = ip6.nexthdr;
		in_l4 = off + sizeof(ip6);
	}
	in.family = f->family;
	if (in.proto == IPPROTO_TCP || in.proto == IPPROTO_UDP || in.proto == IPPROTO_SCTP) {
		__be16 ports[2];
		if (bpf_skb_load_bytes(skb, in_l4, ports, sizeof(ports)) < 0)
			return 0;
		in.sport = ports[0];
		in.dport = ports[1];
	} else if (in.proto == IPPROTO_ICMP || in.proto == IPPROTO_ICMPV6_) {
		__u8 hdr[8];
		if (bpf_skb_load_bytes(skb, in_l4, hdr, sizeof(hdr)) < 0)
			return 0;
		__builtin_memcpy(&in.sport, &hdr[4], 2);
		in.dport = in.sport;
	} else {
		return 0;
	}
	__u8 other = dir == POL_DIR_INGRESS ? POL_DIR_EGRESS : POL_DIR_INGRESS;
	struct pol_ct_key k = {};
	/* The quoted packet opened the flow in the other direction... */
	ct_key(&k, &in, ep_id, other, 0);
	if (bpf_map_lookup_elem(&pol_ct, &k))
		return 1;
	/* ...or replied to a flow opened in this direction. */
	struct pol_ct_key r = {};
	ct_key(&r, &in, ep_id, dir, 1);
	return bpf_map_lookup_elem(&pol_ct, &r) != NULL;
}

static __always_inline void ct_track(const struct flow *f, __u32 ep_id, __u8 dir)
{
	struct pol_ct_key k = {};

	if (f->is_icmp && !is_echo_request(f))
		return; /* only echo requests expect replies */
	ct_key(&k, f, ep_id, dir, 0);
	struct pol_ct_value *v = bpf_map_lookup_elem(&pol_ct, &k);
	__u64 now = bpf_ktime_get_ns();
	if (v) {
		/* Refreshed at most once a second per flow. */
		if (now - v->last_seen > 1000000000ULL)
			v->last_seen = now;
		return;
	}
	struct pol_ct_value nv = {
		.last_seen = now,
		.flags = f->is_icmp ? POL_CT_F_ICMP_ECHO : 0,
	};
	bpf_map_update_elem(&pol_ct, &k, &nv, BPF_ANY);
	stat_inc(POL_STAT_CT_CREATED);
}

static __always_inline int enforce(struct __sk_buff *skb, __u8 dir)
{
	__u32 ifindex = skb->ifindex;
	struct pol_endpoint *ep = bpf_map_lookup_elem(&pol_endpoints, &ifindex);
	if (!ep)
		return TCX_NEXT;
	if (!(ep->flags & POL_F_HAS_POLICY))
		return TCX_NEXT;
	__u32 ep_id = ep->ep_id;
	__u32 deny_flag = dir == POL_DIR_INGRESS ? POL_F_INGRESS_DEFAULT_DENY
						 : POL_F_EGRESS_DEFAULT_DENY;
	int default_deny = (ep->flags & deny_flag) != 0;

	struct flow f = {};
	int r = parse(skb, &f);
	if (r > 0)
		return TCX_NEXT;
	if (r < 0) {
		stat_inc(POL_STAT_DROP_MALFORMED);
		return TC_ACT_SHOT;
	}
	if (f.later_fragment) {
		/* No ports here; the first fragment carried the verdict, and
		 * without it the datagram cannot be reassembled. */
		stat_inc(POL_STAT_FRAGMENT_PASSED);
		return TCX_NEXT;
	}
	/* IPv6 neighbour discovery and router messages are link plumbing,
	 * not traffic a policy talks about. */
	if (f.proto == IPPROTO_ICMPV6_ && f.icmp_type >= 133 && f.icmp_type <= 137) {
		stat_inc(POL_STAT_ALLOW_ND);
		return TCX_NEXT;
	}
	if (f.icmp_error && is_related(skb, &f, ep_id, dir)) {
		stat_inc(POL_STAT_ALLOW_RELATED);
		return TCX_NEXT;
	}
	if (is_reply(&f, ep_id, dir)) {
		stat_inc(POL_STAT_ALLOW_REPLY);
		return TCX_NEXT;
	}

	__u32 identity = peer_identity(&f, dir);
	__be16 port = f.is_icmp ? bpf_htons((__u16)f.icmp_type) : f.dport;
	int a = policy_lookup(ep_id, identity, dir, f.proto, port);
	int b = policy_lookup(ep_id, POL_ID_ANY, dir, f.proto, port);
	if (a == 1 || b == 1) {
		stat_inc(POL_STAT_DROP_POLICY_DENY);
		return TC_ACT_SHOT;
	}
	if (a == 0 || b == 0) {
		stat_inc(POL_STAT_ALLOW_POLICY);
	} else if (default_deny) {
		stat_inc(POL_STAT_DROP_DEFAULT_DENY);
		return TC_ACT_SHOT;
	} else {
		stat_inc(POL_STAT_ALLOW_NOT_ENFORCED);
	}
	ct_track(&f, ep_id, dir);
	return TCX_NEXT;
}

/* tc ingress of the host-side device: the pod's egress. */
SEC("classifier")
int membrane_policy_from_pod(struct __sk_buff *skb)
{
	return enforce(skb, POL_DIR_EGRESS);
}

/* tc egress of the host-side device: the pod's ingress. */
SEC("classifier")
int membrane_policy_to_pod(struct __sk_buff *skb)
{
	return enforce(skb, POL_DIR_INGRESS);
}

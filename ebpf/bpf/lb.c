// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Membrane service load balancer: tc ingress on the host side of pod veths
 * and on external devices.
 *
 * Forward: a packet to a frontend (ClusterIP, NodePort, ...) is DNATed to a
 * backend. Conntrack keeps established flows on their backend; only new
 * flows consult the selection table (random slots or the Maglev table).
 * Reverse: a reply from a backend (matched in lb_rnat) gets the frontend's
 * address and port back as its source. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <stddef.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "lb.h"
#include "lb_maps.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Maglev table size and flow hash seed; set by the loader. */
volatile const __u32 MAGLEV_M = 16381;
volatile const __u32 HASH_SEED = 0x24b7ef82;
/* Forward NATed packets straight to the egress device found by a FIB
 * lookup instead of handing them back to the stack. Needed for NodePort
 * replies (their restored source is a local address, which the input path
 * would drop as martian) and cheaper for everything else. */
volatile const __u32 FIB_REDIRECT = 1;
/* eBPF host routing (Cilium's, not --enable-host-legacy-routing): TCP/UDP
 * arriving from a pod is forwarded by this program, after service
 * translation in the same pass, without the host stack: to a local endpoint
 * by bpf_redirect_peer (lb_endpoints), else by FIB lookup +
 * bpf_redirect_neigh. 0 = the host stack forwards new traffic. Set by the
 * loader after probing the helpers. */
volatile const __u32 HOST_ROUTING = 0;

#define AF_INET 2
#define AF_INET6 10

/* How often an established flow's conntrack timestamp is rewritten and its
 * reverse NAT entry checked (1 s). */
#define CT_REFRESH_NS 1000000000ULL

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct lb_tuple);
	__type(value, struct lb_ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct lb_tuple);
	__type(value, struct lb_rnat_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_rnat SEC(".maps");

/* Local endpoints for host routing; filled by the agent as pods come and go. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct lb_ep_key);
	__type(value, struct lb_ep_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_endpoints SEC(".maps");

/* NodePort to a backend on another node (Cilium's default SNAT mode of
 * its kube-proxy replacement): a flow that comes in on an external device
 * and leaves through one again (the backend is remote) gets this node's
 * address as its source, so the reply comes back through this node and is
 * translated back here.
 *
 * External devices (the node's underlay device, the tunnel device) ->
 * the address to SNAT to when a flow leaves through them; `port` holds the
 * address's family (LB_FAMILY_V4/V6), only flows of that family are
 * SNATed. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, struct lb_rnat_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_snat_dev SEC(".maps");

/* Original tuple (client -> frontend) -> the SNAT address and port. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct lb_tuple);
	__type(value, struct lb_rnat_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_snat_fwd SEC(".maps");

/* What a reply (backend -> SNAT address:port) is translated back to. */
struct lb_snat_rev_value {
	__u8 client[16];
	__u8 frontend[16];
	__be16 client_port;
	__be16 frontend_port;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct lb_tuple);
	__type(value, struct lb_snat_rev_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_snat_rev SEC(".maps");

/* Linux's jhash_3words: a deterministic flow hash, so a flow maps to the
 * same Maglev slot on every node and after every reload. */
static __always_inline __u32 jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	a += 0xdeadbeef + (3 << 2) + initval;
	b += 0xdeadbeef + (3 << 2) + initval;
	c += 0xdeadbeef + (3 << 2) + initval;
	c ^= b; c -= rol32(b, 14);
	a ^= c; a -= rol32(c, 11);
	b ^= a; b -= rol32(a, 25);
	c ^= b; c -= rol32(b, 16);
	a ^= c; a -= rol32(c, 4);
	b ^= a; b -= rol32(a, 14);
	c ^= b; c -= rol32(b, 24);
	return c;
}

struct pkt {
	struct lb_tuple t;
	__u32 l3_off;
	__u32 l4_off;
	__u8 tcp_flags;
};

#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10

#define PARSE_SLOW 2

/* parse() for headers in the linear data (every packet a local socket
 * sends): reads them in place instead of copying each out with a helper
 * call. PARSE_SLOW when they are not all there (or IPv4 options), for
 * parse() to take the copying path. */
static __always_inline int parse_direct(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u8 proto;
	__u8 *l4;

	if ((void *)(eth + 1) > end)
		return PARSE_SLOW;
	p->l3_off = sizeof(*eth);
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end || ip->ihl != 5)
			return PARSE_SLOW;
		if (ip->frag_off & bpf_htons(0x1fff))
			return 1;
		proto = ip->protocol;
		__builtin_memcpy(p->t.saddr, &ip->saddr, 4);
		__builtin_memcpy(p->t.daddr, &ip->daddr, 4);
		p->t.family = LB_FAMILY_V4;
		p->l4_off = p->l3_off + sizeof(*ip);
		l4 = (void *)(ip + 1);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end)
			return PARSE_SLOW;
		proto = ip6->nexthdr;
		__builtin_memcpy(p->t.saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->t.daddr, &ip6->daddr, 16);
		p->t.family = LB_FAMILY_V6;
		p->l4_off = p->l3_off + sizeof(*ip6);
		l4 = (void *)(ip6 + 1);
	} else {
		return 1;
	}
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 1;
	p->t.proto = proto;
	/* Ports, and for TCP the flags byte (offset 13). */
	if (l4 + 14 > (__u8 *)end)
		return PARSE_SLOW;
	__builtin_memcpy(&p->t.sport, l4, 2);
	__builtin_memcpy(&p->t.dport, l4 + 2, 2);
	p->tcp_flags = proto == IPPROTO_TCP ? l4[13] : 0;
	return 0;
}

/* Returns 0 when the packet is TCP/UDP over IPv4/IPv6 with ports, 1 when it
 * is something we leave alone, -1 when it is truncated. */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	struct ethhdr eth;
	__u8 proto;

	int r = parse_direct(skb, p);
	if (r != PARSE_SLOW)
		return r;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return 1;
	p->l3_off = sizeof(eth);
	if (eth.h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, p->l3_off, &ip, sizeof(ip)) < 0)
			return -1;
		if (ip.ihl < 5)
			return -1;
		/* Later fragments carry no ports. */
		if (ip.frag_off & bpf_htons(0x1fff))
			return 1;
		proto = ip.protocol;
		__builtin_memcpy(p->t.saddr, &ip.saddr, 4);
		__builtin_memcpy(p->t.daddr, &ip.daddr, 4);
		p->t.family = LB_FAMILY_V4;
		p->l4_off = p->l3_off + ip.ihl * 4;
	} else if (eth.h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, p->l3_off, &ip6, sizeof(ip6)) < 0)
			return -1;
		/* Extension headers are not walked: services are TCP/UDP
		 * directly after the fixed header. */
		proto = ip6.nexthdr;
		__builtin_memcpy(p->t.saddr, &ip6.saddr, 16);
		__builtin_memcpy(p->t.daddr, &ip6.daddr, 16);
		p->t.family = LB_FAMILY_V6;
		p->l4_off = p->l3_off + sizeof(ip6);
	} else {
		return 1;
	}
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 1;
	p->t.proto = proto;
	__be16 ports[2];
	if (bpf_skb_load_bytes(skb, p->l4_off, ports, sizeof(ports)) < 0)
		return -1;
	p->t.sport = ports[0];
	p->t.dport = ports[1];
	p->tcp_flags = 0;
	if (proto == IPPROTO_TCP &&
	    bpf_skb_load_bytes(skb, p->l4_off + 13, &p->tcp_flags, 1) < 0)
		return -1;
	return 0;
}

static __always_inline __u32 csum_off(const struct pkt *p)
{
	return p->l4_off + (p->t.proto == IPPROTO_TCP ? 16 : 6);
}

/* Rewrites the address at l3 offset `addr_off` and the port at l4 offset
 * `port_off` (0 = source, 2 = destination), fixing both checksums. */
static __always_inline int rewrite(struct __sk_buff *skb, const struct pkt *p, int dst,
				   const __u8 *old_addr, const __u8 *new_addr,
				   __be16 old_port, __be16 new_port)
{
	__u32 l4csum = csum_off(p);
	__u64 mangled = p->t.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (p->t.family == LB_FAMILY_V4) {
		__u32 aoff = p->l3_off + (dst ? offsetof(struct iphdr, daddr)
					      : offsetof(struct iphdr, saddr));
		__be32 o, n;
		__builtin_memcpy(&o, old_addr, 4);
		__builtin_memcpy(&n, new_addr, 4);
		if (o != n) {
			if (bpf_l4_csum_replace(skb, l4csum, o, n,
						BPF_F_PSEUDO_HDR | mangled | 4) < 0)
				return -1;
			if (bpf_l3_csum_replace(skb, p->l3_off + offsetof(struct iphdr, check),
						o, n, 4) < 0)
				return -1;
			if (bpf_skb_store_bytes(skb, aoff, &n, 4, 0) < 0)
				return -1;
		}
	} else {
		__u32 aoff = p->l3_off + (dst ? offsetof(struct ipv6hdr, daddr)
					      : offsetof(struct ipv6hdr, saddr));
		__u8 o[16], n[16];
		__builtin_memcpy(o, old_addr, 16);
		__builtin_memcpy(n, new_addr, 16);
		__s64 diff = bpf_csum_diff((__be32 *)o, 16, (__be32 *)n, 16, 0);
		if (diff < 0)
			return -1;
		if (bpf_l4_csum_replace(skb, l4csum, 0, (__u32)diff,
					BPF_F_PSEUDO_HDR | mangled) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, aoff, n, 16, 0) < 0)
			return -1;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, l4csum, old_port, new_port, mangled | 2) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, p->l4_off + (dst ? 2 : 0), &new_port, 2, 0) < 0)
			return -1;
	}
	return 0;
}

/* After NAT: redirect to the next hop's device, or let the stack route the
 * packet when the FIB has nothing to forward to (local delivery, no route). */
static __always_inline int fib_redirect(struct __sk_buff *skb, const struct pkt *p,
					const __u8 *saddr, const __u8 *daddr)
{
	struct bpf_fib_lookup fib = {};

	if (!FIB_REDIRECT)
		return TC_ACT_OK;
	fib.ifindex = skb->ingress_ifindex;
	fib.l4_protocol = p->t.proto;
	if (p->t.family == LB_FAMILY_V4) {
		fib.family = AF_INET;
		fib.tot_len = skb->len - p->l3_off;
		__builtin_memcpy(&fib.ipv4_src, saddr, 4);
		__builtin_memcpy(&fib.ipv4_dst, daddr, 4);
	} else {
		fib.family = AF_INET6;
		__builtin_memcpy(fib.ipv6_src, saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, daddr, 16);
	}
	long r = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (r == BPF_FIB_LKUP_RET_SUCCESS || r == BPF_FIB_LKUP_RET_NO_NEIGH)
		return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
	return TC_ACT_OK;
}

static __always_inline int mac_is_zero(const __u8 *m)
{
	return (m[0] | m[1] | m[2] | m[3] | m[4] | m[5]) == 0;
}

/* eBPF host routing: a local endpoint gets the packet directly (its host
 * device's peer, i.e. the pod's ingress, skipping the host stack and the
 * backlog queue), anything else goes to the FIB's next hop. Falls back to
 * the stack (TC_ACT_OK) when neither applies: local delivery, no route,
 * forwarding disabled for a remote next hop, or a pod talking to itself. */
static __always_inline int host_route(struct __sk_buff *skb, const struct pkt *p,
				      const __u8 *saddr, const __u8 *daddr)
{
	struct lb_ep_key k = {};
	__builtin_memcpy(k.addr, daddr, 16);
	k.family = p->t.family;
	struct lb_ep_value *ep = bpf_map_lookup_elem(&lb_endpoints, &k);
	if (ep) {
		__u32 ifindex = ep->ifindex;
		__u32 flags = ep->flags;
		if (ifindex == 0 || ifindex == skb->ifindex)
			return TC_ACT_OK;
		__u8 macs[12];
		__builtin_memcpy(macs, ep->mac, 6);
		__builtin_memcpy(macs + 6, ep->node_mac, 6);
		int known = !mac_is_zero(macs) && !mac_is_zero(macs + 6);
		if (known && bpf_skb_store_bytes(skb, 0, macs, 12, 0) < 0)
			return TC_ACT_OK;
		if (flags & LB_EP_F_EGRESS_HOOK) {
			stat_inc(LB_STAT_HOST_ROUTE_EGRESS);
			/* Transmitted on the host device, so the pod's stack
			 * checks the destination MAC: without known MACs the
			 * neighbour table fills them in. */
			if (!known)
				return bpf_redirect_neigh(ifindex, NULL, 0, 0);
			return bpf_redirect(ifindex, 0);
		}
		stat_inc(LB_STAT_HOST_ROUTE_PEER);
		return bpf_redirect_peer(ifindex, 0);
	}

	struct bpf_fib_lookup fib = {};
	fib.ifindex = skb->ingress_ifindex;
	fib.l4_protocol = p->t.proto;
	if (p->t.family == LB_FAMILY_V4) {
		fib.family = AF_INET;
		fib.tot_len = skb->len - p->l3_off;
		__builtin_memcpy(&fib.ipv4_src, saddr, 4);
		__builtin_memcpy(&fib.ipv4_dst, daddr, 4);
	} else {
		fib.family = AF_INET6;
		__builtin_memcpy(fib.ipv6_src, saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, daddr, 16);
	}
	long r = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (r != BPF_FIB_LKUP_RET_SUCCESS && r != BPF_FIB_LKUP_RET_NO_NEIGH)
		return TC_ACT_OK;
	if (fib.ifindex == skb->ifindex)
		return TC_ACT_OK;
	stat_inc(LB_STAT_HOST_ROUTE_FIB);
	return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
}

/* Where a translated packet goes: host routing, or (legacy) the stack for
 * requests; replies keep their FIB redirect in both modes, since a NodePort
 * reply's restored source is a local address the input path would drop. */
static __always_inline int route(struct __sk_buff *skb, const struct pkt *p,
				 const __u8 *saddr, const __u8 *daddr, int reply)
{
	if (HOST_ROUTING)
		return host_route(skb, p, saddr, daddr);
	if (reply)
		return fib_redirect(skb, p, saddr, daddr);
	return TC_ACT_OK;
}

static __always_inline __u32 flow_hash(const struct lb_tuple *t)
{
	__u32 a = 0, w;
#pragma unroll
	for (int i = 0; i < 16; i += 4) {
		__builtin_memcpy(&w, &t->saddr[i], 4);
		a ^= w;
	}
	return jhash_3words(a, ((__u32)t->dport << 16) | t->sport, t->proto, HASH_SEED);
}

/* Egress device of a route to `daddr`; 0 when the FIB has none. */
static __always_inline __u32 fib_egress(struct __sk_buff *skb, const struct pkt *p,
					const __u8 *daddr)
{
	struct bpf_fib_lookup fib = {};

	fib.ifindex = skb->ingress_ifindex;
	fib.l4_protocol = p->t.proto;
	if (p->t.family == LB_FAMILY_V4) {
		fib.family = AF_INET;
		fib.tot_len = skb->len - p->l3_off;
		__builtin_memcpy(&fib.ipv4_src, p->t.saddr, 4);
		__builtin_memcpy(&fib.ipv4_dst, daddr, 4);
	} else {
		fib.family = AF_INET6;
		__builtin_memcpy(fib.ipv6_src, p->t.saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, daddr, 16);
	}
	long r = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (r == BPF_FIB_LKUP_RET_SUCCESS || r == BPF_FIB_LKUP_RET_NO_NEIGH)
		return fib.ifindex;
	return 0;
}

#define SNAT_PORT_MIN 32768
#define SNAT_PORT_RANGE 28232
#define SNAT_TRIES 8

/* After DNAT to `be`: when the flow came in on an external device and the
 * backend is reached through one (another node), rewrite the source to the
 * node's address and a port no other flow to that backend uses. Returns
 * 1 when the source was rewritten, 0 when not needed, -1 to drop. */
static __always_inline int nodeport_snat(struct __sk_buff *skb, struct pkt *p,
					 const struct lb_backend *be)
{
	__u32 in = skb->ingress_ifindex;
	if (!lb_cfg(LB_CFG_SNAT_DEVS) || !bpf_map_lookup_elem(&lb_snat_dev, &in))
		return 0;
	__u32 out = fib_egress(skb, p, be->addr);
	struct lb_rnat_value *dev = out ? bpf_map_lookup_elem(&lb_snat_dev, &out) : NULL;
	if (!dev || dev->port != p->t.family)
		return 0;

	struct lb_rnat_value snat = {};
	struct lb_rnat_value *known = bpf_map_lookup_elem(&lb_snat_fwd, &p->t);
	struct lb_tuple rk = {};
	__builtin_memcpy(rk.saddr, be->addr, 16);
	rk.sport = be->port;
	rk.proto = p->t.proto;
	rk.family = p->t.family;
	if (known) {
		snat = *known;
		__builtin_memcpy(rk.daddr, snat.addr, 16);
		rk.dport = snat.port;
	} else {
		__builtin_memcpy(snat.addr, dev->addr, 16);
		__builtin_memcpy(rk.daddr, dev->addr, 16);
		__u32 h = flow_hash(&p->t);
		int found = 0;
#pragma unroll
		for (int i = 0; i < SNAT_TRIES; i++) {
			/* The client's own port first: most flows keep it. */
			__be16 port = i == 0 ? p->t.sport
				: bpf_htons(SNAT_PORT_MIN + (h + i * 7919) % SNAT_PORT_RANGE);
			rk.dport = port;
			if (!bpf_map_lookup_elem(&lb_snat_rev, &rk)) {
				snat.port = port;
				found = 1;
				break;
			}
		}
		if (!found)
			return -1;
		bpf_map_update_elem(&lb_snat_fwd, &p->t, &snat, BPF_ANY);
	}
	struct lb_snat_rev_value rv = {};
	__builtin_memcpy(rv.client, p->t.saddr, 16);
	__builtin_memcpy(rv.frontend, p->t.daddr, 16);
	rv.client_port = p->t.sport;
	rv.frontend_port = p->t.dport;
	bpf_map_update_elem(&lb_snat_rev, &rk, &rv, BPF_ANY);
	return rewrite(skb, p, 0, p->t.saddr, snat.addr, p->t.sport, snat.port) < 0 ? -1 : 1;
}

/* A reply to a SNATed NodePort flow: back to the client, from the
 * frontend. 1 = handled (verdict in *verdict), 0 = not such a reply. */
static __always_inline int nodeport_snat_reply(struct __sk_buff *skb, struct pkt *p,
					       int *verdict)
{
	/* Such replies come in through a SNAT device (the one the flow
	 * left by); without any, there is nothing to look up. */
	if (!lb_cfg(LB_CFG_SNAT_DEVS))
		return 0;
	struct lb_snat_rev_value *found = bpf_map_lookup_elem(&lb_snat_rev, &p->t);
	if (!found)
		return 0;
	struct lb_snat_rev_value v = *found;
	if (rewrite(skb, p, 1, p->t.daddr, v.client, p->t.dport, v.client_port) < 0 ||
	    rewrite(skb, p, 0, p->t.saddr, v.frontend, p->t.sport, v.frontend_port) < 0) {
		stat_inc(LB_STAT_DROP_REWRITE);
		*verdict = TC_ACT_SHOT;
		return 1;
	}
	stat_inc(LB_STAT_REV_NAT);
	*verdict = fib_redirect(skb, p, v.frontend, v.client);
	return 1;
}

static __always_inline struct lb_backend *backend_of(__u32 id)
{
	return bpf_map_lookup_elem(&lb_backends, &id);
}

/* Picks a backend for a new flow; 0 = none. */
static __always_inline __u32 select_backend(const struct lb_svc_value *svc,
					    const struct lb_tuple *t)
{
	if (svc->count == 0)
		return 0;
	if (svc->algorithm == LB_ALG_MAGLEV) {
		__u32 m = MAGLEV_M;
		if (m == 0)
			return 0;
		__u32 idx = svc->svc_id * m + flow_hash(t) % m;
		__u32 *id = bpf_map_lookup_elem(&lb_maglev, &idx);
		return id ? *id : 0;
	}
	struct lb_slot_key sk = {
		.svc_id = svc->svc_id,
		.slot = bpf_get_prandom_u32() % svc->count,
	};
	__u32 *id = bpf_map_lookup_elem(&lb_slots, &sk);
	return id ? *id : 0;
}

static __always_inline int forward(struct __sk_buff *skb, struct pkt *p,
				   const struct lb_svc_value *svc)
{
	struct lb_tuple ct_key = p->t;
	struct lb_ct_value *ct = bpf_map_lookup_elem(&lb_ct, &ct_key);
	struct lb_backend *be = NULL;
	__u32 backend_id = 0;
	__u64 now = bpf_ktime_get_ns();
	int is_new = 1;
	int refresh = 1;

	if (ct && ct->svc_id == svc->svc_id) {
		backend_id = ct->backend_id;
		be = backend_of(backend_id);
		int syn = (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
		/* Established flows stay on their backend even while it drains
		 * (terminating, quarantined, maintenance); a fresh SYN on a
		 * reused tuple, or a deleted backend, selects again. */
		if (be && (be->state == LB_BACKEND_ACTIVE || !syn)) {
			is_new = 0;
			/* Timestamp and reverse-NAT check at most once per
			 * interval, as Cilium refreshes its CT lifetimes: a
			 * write on every packet dirties the entry's cache line
			 * (shared by every CPU the flow's packets run on) for
			 * nothing, and the entry's LRU reference bit is set by
			 * the lookup anyway. */
			refresh = now - ct->last_seen > CT_REFRESH_NS;
			if (refresh)
				ct->last_seen = now;
		} else {
			stat_inc(LB_STAT_RESELECT);
			be = NULL;
		}
	}

	if (!be) {
		backend_id = 0;
		struct lb_affinity_key ak = {};
		if (svc->affinity_timeout) {
			__builtin_memcpy(ak.addr, p->t.saddr, 16);
			ak.svc_id = svc->svc_id;
			ak.family = p->t.family;
			struct lb_affinity_value *av = bpf_map_lookup_elem(&lb_affinity, &ak);
			if (av && now - av->last_seen < (__u64)svc->affinity_timeout * 1000000000ULL) {
				struct lb_backend *ab = backend_of(av->backend_id);
				if (ab && ab->state == LB_BACKEND_ACTIVE) {
					backend_id = av->backend_id;
					be = ab;
					stat_inc(LB_STAT_AFFINITY_HIT);
				}
			}
		}
		if (!be) {
			backend_id = select_backend(svc, &p->t);
			if (!backend_id) {
				stat_inc(LB_STAT_DROP_NO_BACKEND);
				return TC_ACT_SHOT;
			}
			be = backend_of(backend_id);
			if (!be) {
				stat_inc(LB_STAT_DROP_BACKEND_MISSING);
				return TC_ACT_SHOT;
			}
		}
		if (svc->affinity_timeout) {
			struct lb_affinity_value av = {.backend_id = backend_id, .last_seen = now};
			bpf_map_update_elem(&lb_affinity, &ak, &av, BPF_ANY);
		}
		struct lb_ct_value nv = {
			.backend_id = backend_id,
			.svc_id = svc->svc_id,
			.last_seen = now,
		};
		bpf_map_update_elem(&lb_ct, &ct_key, &nv, BPF_ANY);
	}

	/* Reverse NAT entry keyed by the reply's tuple: written for a new
	 * flow, and restored on the refresh interval if the LRU evicted it
	 * (replies look it up on every packet, which keeps it referenced). */
	if (refresh) {
		struct lb_tuple rk = {};
		__builtin_memcpy(rk.saddr, be->addr, 16);
		__builtin_memcpy(rk.daddr, p->t.saddr, 16);
		rk.sport = be->port;
		rk.dport = p->t.sport;
		rk.proto = p->t.proto;
		rk.family = p->t.family;
		struct lb_rnat_value rv = {};
		__builtin_memcpy(rv.addr, p->t.daddr, 16);
		rv.port = p->t.dport;
		if (is_new || !bpf_map_lookup_elem(&lb_rnat, &rk))
			bpf_map_update_elem(&lb_rnat, &rk, &rv, BPF_ANY);
	}

	__u8 new_addr[16];
	__builtin_memcpy(new_addr, be->addr, 16);
	int snat = -1;
	if (rewrite(skb, p, 1, p->t.daddr, new_addr, p->t.dport, be->port) < 0 ||
	    (snat = nodeport_snat(skb, p, be)) < 0) {
		stat_inc(LB_STAT_DROP_REWRITE);
		return TC_ACT_SHOT;
	}
	stat_inc(is_new ? LB_STAT_FWD_NEW : LB_STAT_FWD_ESTABLISHED);
	/* A SNATed NodePort flow now has a local source address and leaves
	 * through an external device, often the one it came in on: the stack
	 * would drop it as a martian and host routing hands same-device
	 * traffic to the stack, so it always goes to the FIB's next hop. */
	if (snat > 0)
		return fib_redirect(skb, p, p->t.saddr, new_addr);
	return route(skb, p, p->t.saddr, new_addr, 0);
}

static __always_inline struct bpf_sock *
skc_lookup(struct __sk_buff *skb, const struct pkt *p, const __u8 *daddr, __be16 dport)
{
	struct bpf_sock_tuple tup = {};
	__u32 len;

	if (p->t.family == LB_FAMILY_V4) {
		__builtin_memcpy(&tup.ipv4.saddr, p->t.saddr, 4);
		__builtin_memcpy(&tup.ipv4.daddr, daddr, 4);
		tup.ipv4.sport = p->t.sport;
		tup.ipv4.dport = dport;
		len = sizeof(tup.ipv4);
	} else {
		__builtin_memcpy(tup.ipv6.saddr, p->t.saddr, 16);
		__builtin_memcpy(tup.ipv6.daddr, daddr, 16);
		tup.ipv6.sport = p->t.sport;
		tup.ipv6.dport = dport;
		len = sizeof(tup.ipv6);
	}
	return bpf_skc_lookup_tcp(skb, &tup, len, BPF_F_CURRENT_NETNS, 0);
}

/* Transparent redirect (Cilium's tproxy without iptables): the packet
 * keeps its destination (the frontend, which Envoy then sees as the local
 * address) and is assigned to the proxy's socket: the connection's own
 * socket once it exists, else the listener. The mark makes the stack
 * deliver it locally (policy routing set up by the agent). */
static __always_inline int to_proxy(struct __sk_buff *skb, const struct pkt *p,
				    const struct lb_rnat_value *target)
{
	struct bpf_sock *sk;

	/* Only TCP listeners are proxied; other protocols pass untouched. */
	if (p->t.proto != IPPROTO_TCP)
		return TC_ACT_OK;
	sk = skc_lookup(skb, p, p->t.daddr, p->t.dport);
	if (sk && (sk->state == BPF_TCP_LISTEN || sk->state == BPF_TCP_TIME_WAIT)) {
		bpf_sk_release(sk);
		sk = NULL;
	}
	if (!sk) {
		sk = skc_lookup(skb, p, target->addr, target->port);
		if (sk && sk->state != BPF_TCP_LISTEN) {
			bpf_sk_release(sk);
			sk = NULL;
		}
	}
	if (!sk) {
		stat_inc(LB_STAT_DROP_NO_LISTENER);
		return TC_ACT_SHOT;
	}
	long r = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (r < 0) {
		stat_inc(LB_STAT_DROP_NO_LISTENER);
		return TC_ACT_SHOT;
	}
	skb->mark = (skb->mark & ~LB_PROXY_MARK_MASK) | LB_PROXY_MARK;
	stat_inc(LB_STAT_REDIRECT);
	return TC_ACT_OK;
}

SEC("classifier")
int membrane_lb(struct __sk_buff *skb)
{
	struct pkt p = {};
	int r = parse(skb, &p);
	if (r != 0) {
		/* Truncated packets are counted, not dropped: they may not be
		 * service traffic at all, and the stack drops them anyway. */
		if (r < 0)
			stat_inc(LB_STAT_DROP_MALFORMED);
		return TC_ACT_OK;
	}

	struct lb_svc_key sk = {};
	__builtin_memcpy(sk.addr, p.t.daddr, 16);
	sk.port = p.t.dport;
	sk.proto = p.t.proto;
	sk.family = p.t.family;
	/* A packet to no frontend (pod -> pod, and every packet of a flow the
	 * socket LB translated at connect) costs one hash lookup here. */
	struct lb_rnat_value *proxy = redirect_of(&sk);
	if (proxy) {
		struct lb_rnat_value v = *proxy;
		return to_proxy(skb, &p, &v);
	}
	struct lb_svc_value *svc = bpf_map_lookup_elem(&lb_services, &sk);
	if (svc) {
		struct lb_svc_value v = *svc;
		return forward(skb, &p, &v);
	}

	int verdict;
	if (nodeport_snat_reply(skb, &p, &verdict))
		return verdict;

	/* A SYN is no reply: no reverse NAT to look up. (Deleting the reply
	 * tuple's entry here, to drop one a finished NATed flow left on a tuple
	 * a new direct connection reuses, also deleted live entries: the
	 * translated SYN of a flow passes this program again on its way to a
	 * backend behind another hook, e.g. across clusters.) */
	if (p.tcp_flags != TCP_FLAG_SYN) {
		struct lb_rnat_value *rn = bpf_map_lookup_elem(&lb_rnat, &p.t);
		if (rn) {
			struct lb_rnat_value v = *rn;
			if (rewrite(skb, &p, 0, p.t.saddr, v.addr, p.t.sport, v.port) < 0) {
				stat_inc(LB_STAT_DROP_REWRITE);
				return TC_ACT_SHOT;
			}
			stat_inc(LB_STAT_REV_NAT);
			return route(skb, &p, v.addr, p.t.daddr, 1);
		}
	}
	/* Not service traffic: with host routing, pod-to-pod and pod-to-world
	 * packets skip the host stack too. */
	if (HOST_ROUTING)
		return host_route(skb, &p, p.t.saddr, p.t.daddr);
	return TC_ACT_OK;
}

/* Socket LB (Cilium's "host-reachable services"): cgroup sock_addr programs
 * that translate a service frontend to a backend when a process connects
 * (TCP, connected UDP) or sends (unconnected UDP), so processes reach
 * ClusterIPs and the node's NodePorts without any packet NAT: those in the
 * host's network namespace, and (attached at the cgroup root, as Cilium's
 * default kube-proxy replacement does) pods too, whose packets then go to
 * the backend directly and the tc program only forwards them. Nothing here
 * depends on the socket's network namespace: the maps are global, and a
 * pod's processes are in the same cgroup hierarchy. UDP replies (recvmsg) and getpeername show the
 * service address again. The maps are lb.c's, shared through their pins;
 * their definitions here must match lb.c's exactly. */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "lb.h"
#include "lb_maps.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Maglev table size and hash seed; set by the loader (as for lb.c). */
volatile const __u32 MAGLEV_M = 16381;
volatile const __u32 HASH_SEED = 0x24b7ef82;
/* Cookie of the node's network namespace (the loader's); 0 = unknown. */
volatile const __u64 HOST_NETNS_COOKIE = 0;

#define SYS_PROCEED 1

/* Socket cookie + backend -> service, for recvmsg and getpeername. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct lb_sock_rev_key);
	__type(value, struct lb_rnat_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_sock_rev SEC(".maps");

static __always_inline __u32 jhash_2words(__u32 a, __u32 b, __u32 initval)
{
	__u32 c = 0xdeadbeef + (2 << 2) + initval;
	a += c;
	b += c;
	c ^= b; c -= rol32(b, 14);
	a ^= c; a -= rol32(c, 11);
	b ^= a; b -= rol32(a, 25);
	c ^= b; c -= rol32(b, 16);
	a ^= c; a -= rol32(c, 4);
	b ^= a; b -= rol32(a, 14);
	c ^= b; c -= rol32(b, 24);
	return c;
}

/* Picks a backend for a socket; 0 = none. There is no packet tuple at
 * connect time: Maglev hashes the socket cookie (a socket keeps its
 * backend), random takes a random slot. */
static __always_inline __u32 select_backend(const struct lb_svc_value *svc, __u64 cookie)
{
	if (svc->count == 0)
		return 0;
	if (svc->algorithm == LB_ALG_MAGLEV) {
		__u32 m = MAGLEV_M;
		if (m == 0)
			return 0;
		__u32 h = jhash_2words((__u32)cookie, (__u32)(cookie >> 32), HASH_SEED);
		__u32 idx = svc->svc_id * m + h % m;
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

/* Session affinity for host processes: keyed by the network namespace
 * cookie (all of a namespace's processes share the node's client address). */
static __always_inline __u32 affinity_backend(struct bpf_sock_addr *ctx,
					      const struct lb_svc_value *svc, __u8 family,
					      struct lb_affinity_key *ak, __u64 now)
{
	__u64 ns = bpf_get_netns_cookie(ctx);
	__builtin_memcpy(ak->addr, &ns, 8);
	ak->svc_id = svc->svc_id;
	ak->family = family;
	struct lb_affinity_value *av = bpf_map_lookup_elem(&lb_affinity, ak);
	if (!av || now - av->last_seen >= (__u64)svc->affinity_timeout * 1000000000ULL)
		return 0;
	__u32 id = av->backend_id;
	struct lb_backend *be = bpf_map_lookup_elem(&lb_backends, &id);
	if (!be || be->state != LB_BACKEND_ACTIVE)
		return 0;
	return id;
}

/* Translates `addr:port` (network order, in place) when it is a frontend.
 * `addr` holds 4 (IPv4) or 16 bytes. */
static __always_inline void translate(struct bpf_sock_addr *ctx, __u8 family, __u8 proto,
				      __u8 *addr, __be16 *port)
{
	struct lb_svc_key key = {};
	__u32 alen = family == LB_FAMILY_V4 ? 4 : 16;

	__builtin_memcpy(key.addr, addr, 16);
	key.port = *port;
	key.proto = proto;
	key.family = family;
	struct lb_svc_value *svcp = bpf_map_lookup_elem(&lb_services, &key);
	if (!svcp)
		return;
	/* A pod's connection to a frontend the tc program delivers to a local
	 * proxy (Envoy) keeps the frontend: the program needs it in the packet
	 * to find the listener (Cilium's socket LB skips L7 LB services
	 * outside the host namespace too). The node's own processes pass no
	 * tc hook on their way out, so they keep reaching a backend. */
	if (proto == IPPROTO_TCP && redirect_of(&key) &&
	    bpf_get_netns_cookie(ctx) != HOST_NETNS_COOKIE)
		return;
	struct lb_svc_value svc = *svcp;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	__u64 now = bpf_ktime_get_ns();
	struct lb_affinity_key ak = {};
	__u32 id = 0;
	if (svc.affinity_timeout)
		id = affinity_backend(ctx, &svc, family, &ak, now);
	if (!id)
		id = select_backend(&svc, cookie);
	if (!id) {
		/* As the tc program: no backend, no connection. Leave the
		 * address as it is (the frontend answers nothing). */
		stat_inc(LB_STAT_DROP_NO_BACKEND);
		return;
	}
	struct lb_backend *be = bpf_map_lookup_elem(&lb_backends, &id);
	if (!be) {
		stat_inc(LB_STAT_DROP_BACKEND_MISSING);
		return;
	}
	if (svc.affinity_timeout) {
		struct lb_affinity_value av = {.backend_id = id, .last_seen = now};
		bpf_map_update_elem(&lb_affinity, &ak, &av, BPF_ANY);
	}
	struct lb_sock_rev_key rk = {};
	rk.cookie = cookie;
	__builtin_memcpy(rk.addr, be->addr, 16);
	rk.port = be->port;
	rk.family = family;
	struct lb_rnat_value rv = {};
	__builtin_memcpy(rv.addr, key.addr, 16);
	rv.port = key.port;
	bpf_map_update_elem(&lb_sock_rev, &rk, &rv, BPF_ANY);

	if (alen == 4)
		__builtin_memcpy(addr, be->addr, 4);
	else
		__builtin_memcpy(addr, be->addr, 16);
	*port = be->port;
	stat_inc(LB_STAT_SOCK_TRANSLATE);
}

/* Shows the service again for a peer that is a backend this socket was
 * translated to. */
static __always_inline int reverse(struct bpf_sock_addr *ctx, __u8 family, __u8 *addr,
				   __be16 *port)
{
	struct lb_sock_rev_key rk = {};
	rk.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(rk.addr, addr, 16);
	rk.port = *port;
	rk.family = family;
	struct lb_rnat_value *rv = bpf_map_lookup_elem(&lb_sock_rev, &rk);
	if (!rv)
		return 0;
	if (family == LB_FAMILY_V4)
		__builtin_memcpy(addr, rv->addr, 4);
	else
		__builtin_memcpy(addr, rv->addr, 16);
	*port = rv->port;
	stat_inc(LB_STAT_SOCK_REV);
	return 1;
}

static __always_inline __u8 sock_proto(struct bpf_sock_addr *ctx)
{
	/* Only TCP and UDP sockets; the protocol field is 0 for the
	 * default protocol of the type. */
	if (ctx->type == 1 /* SOCK_STREAM */)
		return IPPROTO_TCP;
	if (ctx->type == 2 /* SOCK_DGRAM */)
		return IPPROTO_UDP;
	return 0;
}

static __always_inline int xlate4(struct bpf_sock_addr *ctx)
{
	__u8 proto = sock_proto(ctx);
	if (!proto)
		return SYS_PROCEED;
	if (proto == IPPROTO_TCP && ctx->protocol != 0 && ctx->protocol != IPPROTO_TCP)
		return SYS_PROCEED;
	__u8 addr[16] = {};
	__u32 ip = ctx->user_ip4;
	__builtin_memcpy(addr, &ip, 4);
	__be16 port = (__be16)ctx->user_port;
	translate(ctx, LB_FAMILY_V4, proto, addr, &port);
	__builtin_memcpy(&ip, addr, 4);
	ctx->user_ip4 = ip;
	ctx->user_port = port;
	return SYS_PROCEED;
}

static __always_inline int rev4(struct bpf_sock_addr *ctx)
{
	__u8 addr[16] = {};
	__u32 ip = ctx->user_ip4;
	__builtin_memcpy(addr, &ip, 4);
	__be16 port = (__be16)ctx->user_port;
	if (reverse(ctx, LB_FAMILY_V4, addr, &port)) {
		__builtin_memcpy(&ip, addr, 4);
		ctx->user_ip4 = ip;
		ctx->user_port = port;
	}
	return SYS_PROCEED;
}

static __always_inline void load6(struct bpf_sock_addr *ctx, __u8 *addr)
{
	__u32 w[4];
	w[0] = ctx->user_ip6[0];
	w[1] = ctx->user_ip6[1];
	w[2] = ctx->user_ip6[2];
	w[3] = ctx->user_ip6[3];
	__builtin_memcpy(addr, w, 16);
}

static __always_inline void store6(struct bpf_sock_addr *ctx, const __u8 *addr)
{
	__u32 w[4];
	__builtin_memcpy(w, addr, 16);
	ctx->user_ip6[0] = w[0];
	ctx->user_ip6[1] = w[1];
	ctx->user_ip6[2] = w[2];
	ctx->user_ip6[3] = w[3];
}

/* ::ffff:a.b.c.d, what a dual-stack socket uses for an IPv4 peer. */
static __always_inline int v4_mapped(const __u8 *a)
{
	__u32 w[3];
	__builtin_memcpy(w, a, 12);
	return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0xffff);
}

/* An IPv6 socket's address: IPv4-mapped ones are IPv4 frontends. */
static __always_inline int xlate6(struct bpf_sock_addr *ctx)
{
	__u8 proto = sock_proto(ctx);
	if (!proto)
		return SYS_PROCEED;
	__u8 addr[16];
	load6(ctx, addr);
	__be16 port = (__be16)ctx->user_port;
	if (v4_mapped(addr)) {
		__u8 a4[16] = {};
		__builtin_memcpy(a4, addr + 12, 4);
		translate(ctx, LB_FAMILY_V4, proto, a4, &port);
		__builtin_memcpy(addr + 12, a4, 4);
	} else {
		translate(ctx, LB_FAMILY_V6, proto, addr, &port);
	}
	store6(ctx, addr);
	ctx->user_port = port;
	return SYS_PROCEED;
}

static __always_inline int rev6(struct bpf_sock_addr *ctx)
{
	__u8 addr[16];
	load6(ctx, addr);
	__be16 port = (__be16)ctx->user_port;
	int done;
	if (v4_mapped(addr)) {
		__u8 a4[16] = {};
		__builtin_memcpy(a4, addr + 12, 4);
		done = reverse(ctx, LB_FAMILY_V4, a4, &port);
		__builtin_memcpy(addr + 12, a4, 4);
	} else {
		done = reverse(ctx, LB_FAMILY_V6, addr, &port);
	}
	if (done) {
		store6(ctx, addr);
		ctx->user_port = port;
	}
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int membrane_sock_connect4(struct bpf_sock_addr *ctx)
{
	return xlate4(ctx);
}

SEC("cgroup/sendmsg4")
int membrane_sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return xlate4(ctx);
}

SEC("cgroup/recvmsg4")
int membrane_sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return rev4(ctx);
}

SEC("cgroup/getpeername4")
int membrane_sock_getpeername4(struct bpf_sock_addr *ctx)
{
	return rev4(ctx);
}

SEC("cgroup/connect6")
int membrane_sock_connect6(struct bpf_sock_addr *ctx)
{
	return xlate6(ctx);
}

SEC("cgroup/sendmsg6")
int membrane_sock_sendmsg6(struct bpf_sock_addr *ctx)
{
	return xlate6(ctx);
}

SEC("cgroup/recvmsg6")
int membrane_sock_recvmsg6(struct bpf_sock_addr *ctx)
{
	return rev6(ctx);
}

SEC("cgroup/getpeername6")
int membrane_sock_getpeername6(struct bpf_sock_addr *ctx)
{
	return rev6(ctx);
}

/* The service maps the tc program (lb.c) and the socket LB (sock.c) share
 * by pin name: one definition, so the two objects can never disagree on a
 * map's shape (the loader would refuse the second pin). */
#ifndef MEMBRANE_LB_MAPS_H
#define MEMBRANE_LB_MAPS_H

#include "lb.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct lb_svc_key);
	__type(value, struct lb_svc_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct lb_backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct lb_slot_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_slots SEC(".maps");

/* One flat table: service id * MAGLEV_M + slot -> backend id. The loader
 * sizes it (max Maglev services * M). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct lb_affinity_key);
	__type(value, struct lb_affinity_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_stats SEC(".maps");

/* Frontends delivered to a local (Envoy) listener instead of a backend:
 * frontend -> the listener's address and port. The tc program hands their
 * packets to the listener; the socket LB leaves them alone so it can. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct lb_svc_key);
	__type(value, struct lb_rnat_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_redirect SEC(".maps");

/* LB_CFG_* counts, written by the loader. An array: the verifier inlines
 * the lookup, so reading it costs a load, not a hash. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_CFG_MAX);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_config SEC(".maps");

static __always_inline __u32 lb_cfg(__u32 idx)
{
	__u32 *v = bpf_map_lookup_elem(&lb_config, &idx);
	return v ? *v : 0;
}

/* The listener a frontend is redirected to, if any (one hash lookup only
 * while some frontend is redirected). */
static __always_inline struct lb_rnat_value *redirect_of(const struct lb_svc_key *k)
{
	if (!lb_cfg(LB_CFG_REDIRECTS))
		return NULL;
	return bpf_map_lookup_elem(&lb_redirect, k);
}

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&lb_stats, &idx);
	if (v)
		__sync_fetch_and_add(v, 1);
}

#define rol32(w, s) (((w) << (s)) | ((w) >> (32 - (s))))

#endif

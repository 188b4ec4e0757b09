//! etcd I/O (next step).

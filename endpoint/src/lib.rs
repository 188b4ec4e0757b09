//! Agent side of the CNI plugin (work in progress).

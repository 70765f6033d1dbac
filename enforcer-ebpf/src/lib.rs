//! Empty library target: the user crate build-depends on this crate so that
//! cargo rebuilds it when the eBPF sources change. The programs are the
//! binary target, built for the BPF target by `aya-build`.
#![no_std]

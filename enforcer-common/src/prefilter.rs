//! The destination pre-filter: a bit array of address buckets that lets
//! ordinary destinations skip the rule trie. The programs read it with
//! [`bucket`]; the daemon writes it with [`bucket_words`]. Both sides are
//! here so they cannot disagree on what a bucket is.

use crate::{AddrBytes, AddrWords};

/// Buckets of the destination pre-filter: one per value of the first 16
/// bits of an IPv4 address, then one per value of the first 16 bits of an
/// IPv6 address. A bucket's bit is set when a deny rule covers any address
/// in it; destinations in clear buckets skip the trie.
pub const BUCKET_COUNT: u32 = 2 * 65536;
/// `u64` words of the pre-filter array.
pub const BUCKET_WORDS: u32 = BUCKET_COUNT / 64;
/// First bucket of the IPv6 half.
pub const IPV6_BUCKETS_START: u32 = 65536;

impl AddrWords {
    /// The pre-filter bucket: the first 16 bits of the IPv4 address, or of
    /// the IPv6 address in the second half. The programs call this on the
    /// words they carry; [`bucket`] is the same for the byte form.
    #[inline(always)]
    pub const fn bucket(self) -> u32 {
        if self.is_ipv4_mapped() {
            let [_, _, _, _, a, b, _, _] = self.lo.to_ne_bytes();
            ((a as u32) << 8) | b as u32
        } else {
            let [a, b, _, _, _, _, _, _] = self.hi.to_ne_bytes();
            IPV6_BUCKETS_START + (((a as u32) << 8) | b as u32)
        }
    }
}

/// Whether a trie-form address is IPv4-mapped (`::ffff:a.b.c.d`).
#[inline(always)]
pub const fn is_ipv4_mapped(addr: &AddrBytes) -> bool {
    AddrWords::from_bytes(*addr).is_ipv4_mapped()
}

/// The pre-filter bucket of a trie-form address.
#[inline(always)]
pub const fn bucket(addr: &AddrBytes) -> u32 {
    AddrWords::from_bytes(*addr).bucket()
}

/// The pre-filter's words for a set of deny rules given by their trie keys
/// (prefix length, address): a bucket's bit is set when a key covers any
/// address that [`bucket`] puts in it. Pass rules only ever let through, so
/// they need no bucket.
#[cfg(any(test, feature = "std"))]
pub fn bucket_words(deny_keys: impl IntoIterator<Item = (u32, AddrBytes)>) -> Vec<u64> {
    let mut words = vec![0u64; BUCKET_WORDS as usize];
    for (prefix_len, addr) in deny_keys {
        covered_buckets(prefix_len, addr, |first, count| {
            for bucket in first..first + count {
                words[(bucket / 64) as usize] |= 1 << (bucket % 64);
            }
        });
    }
    words
}

/// The top `bits` bits of a 128-bit address.
#[cfg(any(test, feature = "std"))]
fn top_bits(bits: u32) -> u128 {
    if bits == 0 {
        0
    } else {
        !0u128 << (128 - bits.min(128))
    }
}

/// Calls `mark(first, count)` for the buckets a trie key covers: the IPv4
/// buckets of the IPv4-mapped addresses it holds, and the IPv6 buckets of
/// the others.
#[cfg(any(test, feature = "std"))]
fn covered_buckets(prefix_len: u32, addr: AddrBytes, mut mark: impl FnMut(u32, u32)) {
    const MAPPED: u128 = 0xffff_0000_0000;
    let a = u128::from_be_bytes(addr);
    let in_mapped_range = (a ^ MAPPED) & top_bits(prefix_len.min(96)) == 0;
    let v4_first16 = ((a >> 16) & 0xffff) as u32;
    if in_mapped_range {
        match prefix_len {
            112.. => mark(v4_first16, 1),
            96..=111 => {
                let span = 1 << (112 - prefix_len);
                mark(v4_first16 & !(span - 1), span);
            }
            _ => mark(0, 65536),
        }
    }
    // A key entirely within ::ffff:0:0/96 holds no other address.
    if !(in_mapped_range && prefix_len >= 96) {
        let v6_first16 = (a >> 112) as u32;
        let span = if prefix_len >= 16 {
            1
        } else {
            1 << (16 - prefix_len)
        };
        mark(IPV6_BUCKETS_START + (v6_first16 & !(span - 1)), span);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipv4_mapped;

    fn marked(prefix_len: u32, addr: AddrBytes) -> Vec<(u32, u32)> {
        let mut marked = Vec::new();
        covered_buckets(prefix_len, addr, |first, count| marked.push((first, count)));
        marked
    }

    #[test]
    fn ipv6_rules_over_the_mapped_range_mark_ipv4_buckets() {
        // ::ffff:169.254.0.0/112 is 169.254.0.0/16 as an IPv6 prefix.
        assert_eq!(
            marked(112, ipv4_mapped([169, 254, 0, 0])),
            [(u32::from(u16::from_be_bytes([169, 254])), 1)]
        );
        // ::/8 holds the whole IPv4-mapped range and 256 IPv6 buckets.
        assert_eq!(marked(8, [0; 16]), [(0, 65536), (IPV6_BUCKETS_START, 256)]);
    }

    /// What the writer marks is what the reader looks up: every address a
    /// key covers lands in a set bucket.
    #[test]
    fn the_reader_finds_every_bucket_the_writer_marks() {
        let set = |words: &[u64], addr: &AddrBytes| {
            let b = bucket(addr);
            words[(b / 64) as usize] & (1 << (b % 64)) != 0
        };
        // 100.64.0.0/10 as a trie key: 64 IPv4 buckets.
        let words = bucket_words([(96 + 10, ipv4_mapped([100, 64, 0, 0]))]);
        for second in 64..128 {
            assert!(set(&words, &ipv4_mapped([100, second, 7, 1])), "{second}");
        }
        assert!(!set(&words, &ipv4_mapped([100, 128, 0, 1])));
        assert!(!set(&words, &ipv4_mapped([100, 63, 255, 255])));
        let mut fe80 = [0; 16];
        fe80[0] = 0xfe;
        fe80[1] = 0x80;
        let words = bucket_words([(10, fe80)]);
        for second in 0x80..=0xbf {
            let mut addr = fe80;
            addr[1] = second;
            addr[15] = 1;
            assert!(set(&words, &addr), "{second:#x}");
        }
        let mut outside = fe80;
        outside[1] = 0xc0;
        assert!(!set(&words, &outside));
        assert!(bucket_words([]).iter().all(|w| *w == 0));
    }
}

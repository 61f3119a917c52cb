//! A small git-delta encoder, used when an object we must send whole has a
//! version on the client (a thin-pack base) at the same path.
//!
//! Blocks of the base are indexed by a hash of their first [`BLOCK`] bytes;
//! the target is scanned for block matches, which are extended in both
//! directions and emitted as copy instructions, the rest as inserts.

const BLOCK: usize = 16;
/// Largest size one copy instruction may carry (git's encoder uses the same).
const MAX_COPY: usize = 0x10000;

fn write_varint(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn block_hash(b: &[u8]) -> u64 {
    let lo = u64::from_le_bytes(b[..8].try_into().expect("block has 16 bytes"));
    let hi = u64::from_le_bytes(b[8..16].try_into().expect("block has 16 bytes"));
    (lo ^ hi.rotate_left(29)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn emit_insert(out: &mut Vec<u8>, mut data: &[u8]) {
    while !data.is_empty() {
        let n = data.len().min(127);
        out.push(n as u8);
        out.extend_from_slice(&data[..n]);
        data = &data[n..];
    }
}

fn emit_copy(out: &mut Vec<u8>, mut offset: usize, mut len: usize) {
    while len > 0 {
        let n = len.min(MAX_COPY);
        let pos = out.len();
        out.push(0x80);
        let mut cmd = 0x80u8;
        for i in 0..4 {
            let byte = (offset >> (8 * i)) as u8;
            if byte != 0 {
                cmd |= 1 << i;
                out.push(byte);
            }
        }
        // A size of 0x10000 is encoded as no size bytes at all.
        let size = if n == MAX_COPY { 0 } else { n };
        for i in 0..3 {
            let byte = (size >> (8 * i)) as u8;
            if byte != 0 {
                cmd |= 0x10 << i;
                out.push(byte);
            }
        }
        out[pos] = cmd;
        offset += n;
        len -= n;
    }
}

/// Encodes `target` as a delta against `base`; `None` if the delta would
/// not be shorter than `max_len` bytes (or the inputs are too large).
pub(crate) fn encode(base: &[u8], target: &[u8], max_len: usize) -> Option<Vec<u8>> {
    // Copy offsets are limited to 32 bits.
    if base.len() < BLOCK || target.len() < BLOCK || base.len() > u32::MAX as usize {
        return None;
    }
    let bits = (base.len() / BLOCK)
        .next_power_of_two()
        .trailing_zeros()
        .clamp(4, 24);
    let mask = (1usize << bits) - 1;
    let mut table = vec![u32::MAX; 1 << bits];
    // Index from the back so that earlier blocks win on collisions.
    let mut pos = (base.len() - BLOCK) / BLOCK * BLOCK;
    loop {
        let h = (block_hash(&base[pos..pos + BLOCK]) >> (64 - bits)) as usize & mask;
        table[h] = pos as u32;
        if pos == 0 {
            break;
        }
        pos -= BLOCK;
    }

    let mut out = Vec::with_capacity(max_len.min(target.len() / 2 + 32));
    write_varint(&mut out, base.len());
    write_varint(&mut out, target.len());
    let mut insert_from = 0;
    let mut i = 0;
    while i + BLOCK <= target.len() {
        let h = (block_hash(&target[i..i + BLOCK]) >> (64 - bits)) as usize & mask;
        let cand = table[h];
        if cand != u32::MAX {
            let mut b = cand as usize;
            if base[b..b + BLOCK] == target[i..i + BLOCK] {
                let mut t = i;
                while t > insert_from && b > 0 && base[b - 1] == target[t - 1] {
                    t -= 1;
                    b -= 1;
                }
                let mut len = 0;
                while b + len < base.len()
                    && t + len < target.len()
                    && base[b + len] == target[t + len]
                {
                    len += 1;
                }
                emit_insert(&mut out, &target[insert_from..t]);
                emit_copy(&mut out, b, len);
                i = t + len;
                insert_from = i;
                if out.len() >= max_len {
                    return None;
                }
                continue;
            }
        }
        i += 1;
    }
    emit_insert(&mut out, &target[insert_from..]);
    (out.len() < max_len).then_some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn read_varint(d: &[u8], pos: &mut usize) -> usize {
        let mut n = 0;
        let mut shift = 0;
        loop {
            let b = d[*pos];
            *pos += 1;
            n |= ((b & 0x7f) as usize) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                return n;
            }
        }
    }

    /// Applies a git delta; test-only reference implementation.
    pub(crate) fn apply(base: &[u8], delta: &[u8]) -> Vec<u8> {
        let mut p = 0;
        assert_eq!(read_varint(delta, &mut p), base.len());
        let size = read_varint(delta, &mut p);
        let mut out = Vec::new();
        while p < delta.len() {
            let cmd = delta[p];
            p += 1;
            if cmd & 0x80 != 0 {
                let mut off = 0usize;
                let mut len = 0usize;
                for i in 0..4 {
                    if cmd & (1 << i) != 0 {
                        off |= (delta[p] as usize) << (8 * i);
                        p += 1;
                    }
                }
                for i in 0..3 {
                    if cmd & (0x10 << i) != 0 {
                        len |= (delta[p] as usize) << (8 * i);
                        p += 1;
                    }
                }
                if len == 0 {
                    len = 0x10000;
                }
                out.extend_from_slice(&base[off..off + len]);
            } else {
                let n = cmd as usize;
                assert!(n > 0);
                out.extend_from_slice(&delta[p..p + n]);
                p += n;
            }
        }
        assert_eq!(out.len(), size);
        out
    }

    #[test]
    fn round_trips_edits() {
        let base: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        let mut target = base.clone();
        target.splice(1000..1010, b"CHANGED!".iter().copied());
        target.extend_from_slice(b"appended tail\n");
        target.drain(50_000..50_100);
        let d = encode(&base, &target, target.len()).expect("similar inputs delta well");
        assert!(d.len() < 200, "delta too large: {}", d.len());
        assert_eq!(apply(&base, &d), target);
    }

    #[test]
    fn declines_unrelated_or_tiny() {
        let a: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let b: Vec<u8> = (0..4096u32).map(|i| (i * 13 % 241) as u8 ^ 0x5a).collect();
        assert!(encode(&a, &b, b.len() / 2).is_none());
        assert!(encode(b"short", b"shorter", 100).is_none());
    }

    #[test]
    fn large_copies_are_split() {
        let base: Vec<u8> = (0..300_000u32)
            .map(|i| (i % 253) as u8 ^ (i >> 9) as u8)
            .collect();
        let d = encode(&base, &base, base.len()).expect("identical");
        assert_eq!(apply(&base, &d), base);
    }
}

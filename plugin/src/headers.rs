//! proxy-wasm's serialized header map, read in place: `[u32 n]`, n × `[u32 name_len][u32
//! value_len]`, then each name and value followed by a NUL. Bytes, not strings: a header value
//! may hold any byte, and a map that does not add up reads as empty instead of panicking.

use alloc::vec::Vec;

/// A serialized header map borrowed from the host's buffer.
#[derive(Clone, Copy, Debug)]
pub struct HeaderMap<'a> {
    bytes: &'a [u8],
}

impl<'a> HeaderMap<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        HeaderMap { bytes }
    }

    /// The pairs, in order. Stops at the first inconsistency (a truncated or lying buffer).
    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let bytes = self.bytes;
        let count = read_u32(bytes, 0).unwrap_or(0) as usize;
        // The sizes table must fit, or the map is malformed: read nothing.
        let table_end = count.checked_mul(8).and_then(|n| n.checked_add(4)).filter(|end| *end <= bytes.len());
        let count = if table_end.is_some() { count } else { 0 };
        let mut data = table_end.unwrap_or(bytes.len());
        (0..count).map_while(move |i| {
            let name_len = read_u32(bytes, 4 + 8 * i)? as usize;
            let value_len = read_u32(bytes, 8 + 8 * i)? as usize;
            let name = bytes.get(data..data.checked_add(name_len)?)?;
            let value_start = data.checked_add(name_len)?.checked_add(1)?;
            let value = bytes.get(value_start..value_start.checked_add(value_len)?)?;
            data = value_start.checked_add(value_len)?.checked_add(1)?;
            Some((name, value))
        })
    }

    /// The first value of `name` (lower-case, as Envoy stores header names).
    pub fn get(&self, name: &[u8]) -> Option<&'a [u8]> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let chunk = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(chunk.try_into().ok()?))
}

/// Serializes pairs into the same format (for local replies, and the fake host).
pub fn serialize(pairs: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = alloc::vec![0; serialized_len(pairs)];
    let n = serialize_into(pairs, &mut out).unwrap_or(0);
    out.truncate(n);
    out
}

/// The size of `pairs` serialized.
pub fn serialized_len(pairs: &[(&str, &[u8])]) -> usize {
    4 + pairs.iter().map(|(n, v)| n.len() + v.len() + 10).sum::<usize>()
}

/// Serializes `pairs` into `out` (at least [`serialized_len`] long); returns the length written,
/// None if `out` is too short. A local reply serializes its few headers on the stack.
pub fn serialize_into(pairs: &[(&str, &[u8])], out: &mut [u8]) -> Option<usize> {
    let mut at = 0usize;
    let mut put = |bytes: &[u8]| {
        let end = at.checked_add(bytes.len())?;
        out.get_mut(at..end)?.copy_from_slice(bytes);
        at = end;
        Some(())
    };
    put(&(pairs.len() as u32).to_le_bytes())?;
    for (n, v) in pairs {
        put(&(n.len() as u32).to_le_bytes())?;
        put(&(v.len() as u32).to_le_bytes())?;
    }
    for (n, v) in pairs {
        put(n.as_bytes())?;
        put(&[0])?;
        put(v)?;
        put(&[0])?;
    }
    Some(at)
}

/// A decimal number made of ASCII digits only (no sign, no spaces), as Envoy writes
/// `:status`, `grpc-status`, `x-envoy-upstream-service-time` and `x-envoy-attempt-count`.
pub fn parse_u64(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 {
        return None;
    }
    v.iter().try_fold(0u64, |n, b| b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0')))
}

/// `n` in decimal, written into `buf` (for header values, without allocating).
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        if let Some(d) = buf.get_mut(i) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    buf.get(i..).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_it_wrote_including_bytes_that_are_not_utf8() {
        let bytes = serialize(&[(":status", b"200"), ("grpc-status", b"\xff"), ("x-empty", b"")]);
        let m = HeaderMap::new(&bytes);
        assert_eq!(m.get(b":status"), Some(&b"200"[..]));
        assert_eq!(m.get(b"grpc-status"), Some(&b"\xff"[..]));
        assert_eq!(m.get(b"x-empty"), Some(&b""[..]));
        assert_eq!(m.get(b"absent"), None);
        assert_eq!(m.iter().count(), 3);
    }

    #[test]
    fn a_malformed_map_reads_as_empty_or_stops_early_never_panics() {
        let good = serialize(&[("a", b"1"), ("b", b"2")]);
        for cut in 0..good.len() {
            let m = HeaderMap::new(&good[..cut]);
            assert!(m.iter().count() <= 2);
        }
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(HeaderMap::new(&huge).iter().count(), 0);
        let mut lying = good;
        lying[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(HeaderMap::new(&lying).iter().count(), 0);
    }

    #[test]
    fn decimal_writes_every_width() {
        for n in [0u64, 7, 10, 12345, u64::MAX] {
            let mut buf = [0u8; 20];
            assert_eq!(decimal(n, &mut buf), alloc::format!("{n}").as_bytes());
        }
    }

    #[test]
    fn numbers_are_plain_ascii_digits() {
        assert_eq!(parse_u64(b"503"), Some(503));
        assert_eq!(parse_u64(b"0"), Some(0));
        for bad in [&b""[..], b"-1", b" 1", b"1 ", b"1.5", b"\xff", b"99999999999999999999"] {
            assert_eq!(parse_u64(bad), None, "{bad:?}");
        }
    }
}

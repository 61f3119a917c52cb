//! Ref name validity as `git check-ref-format` defines it, plus the
//! receive-pack rule that pushed names live under `refs/`, and the length
//! cap that keeps every advertisement line inside a pkt-line.

use super::Command;
use crate::refs::MAX_REF_NAME_LEN;

/// Why `cmd` may not create or move a ref of its name's length, if so.
/// Deletes are exempt, so that refs stored before the cap stay removable.
///
/// Not part of [`plan_updates`](super::plan_updates), which replicas run
/// on logged entries: the cap is decided once, by whoever validates the
/// push, and travels with it as a rejection.
pub fn check_ref_name_length(cmd: &Command) -> Option<String> {
    (!cmd.is_delete() && cmd.name.len() > MAX_REF_NAME_LEN).then(|| {
        format!(
            "ref name too long ({} bytes, limit {MAX_REF_NAME_LEN})",
            cmd.name.len()
        )
    })
}

/// Checks a full ref name; `Err` carries why it is refused.
pub fn check_ref_name(name: &str) -> Result<(), &'static str> {
    let Some(rest) = name.strip_prefix("refs/") else {
        return Err("ref name must start with refs/");
    };
    if rest.is_empty() {
        return Err("ref name has no component after refs/");
    }
    if name.ends_with('.') {
        return Err("ref name ends with a dot");
    }
    if name.contains("..") {
        return Err("ref name contains ..");
    }
    if name.contains("@{") {
        return Err("ref name contains @{");
    }
    if let Some(c) = name
        .bytes()
        .find(|&b| b < 0x20 || b == 0x7f || b" ~^:?*[\\".contains(&b))
    {
        return Err(if c < 0x20 || c == 0x7f {
            "ref name contains a control character"
        } else {
            "ref name contains a forbidden character"
        });
    }
    for component in name.split('/') {
        if component.is_empty() {
            return Err("ref name has an empty component");
        }
        if component.starts_with('.') {
            return Err("ref name component starts with a dot");
        }
        if component.ends_with(".lock") {
            return Err("ref name component ends with .lock");
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn length_cap_spares_deletes() {
        let id = |b: u8| gix_hash::ObjectId::from_bytes_or_panic(&[b; 20]);
        let cmd = |old: u8, new: u8, len: usize| Command {
            old: id(old),
            new: id(new),
            name: format!("refs/heads/{}", "x".repeat(len - 11)),
        };
        assert_eq!(check_ref_name_length(&cmd(0, 1, MAX_REF_NAME_LEN)), None);
        assert_eq!(
            check_ref_name_length(&cmd(0, 1, MAX_REF_NAME_LEN + 1)).as_deref(),
            Some("ref name too long (4097 bytes, limit 4096)")
        );
        assert_eq!(
            check_ref_name_length(&cmd(2, 1, 65_000)).as_deref(),
            Some("ref name too long (65000 bytes, limit 4096)")
        );
        assert_eq!(check_ref_name_length(&cmd(2, 0, 65_000)), None);
    }

    #[test]
    fn table() {
        let cases: &[(&str, bool)] = &[
            ("refs/heads/main", true),
            ("refs/heads/feature/x-1_2", true),
            ("refs/tags/v1.0", true),
            ("refs/heads/ünïcode", true),
            ("refs/heads/a@b", true),
            ("refs/heads/main", true),
            ("HEAD", false),
            ("heads/main", false),
            ("refs/", false),
            ("refs", false),
            ("refs/heads/", false),
            ("refs//heads", false),
            ("refs/heads//x", false),
            ("refs/heads/.hidden", false),
            ("refs/heads/x.lock", false),
            ("refs/heads/x.lock/y", false),
            ("refs/heads/a..b", false),
            ("refs/heads/a.", false),
            ("refs/heads/a b", false),
            ("refs/heads/a~1", false),
            ("refs/heads/a^", false),
            ("refs/heads/a:b", false),
            ("refs/heads/a?", false),
            ("refs/heads/a*", false),
            ("refs/heads/a[", false),
            ("refs/heads/a\\b", false),
            ("refs/heads/a@{1}", false),
            ("refs/heads/a\x01", false),
            ("refs/heads/a\x7f", false),
        ];
        for (name, ok) in cases {
            assert_eq!(check_ref_name(name).is_ok(), *ok, "{name:?}");
        }
    }
}

//! Reading blkdebug rules the two ways QEMU takes them: a config file in
//! `-readconfig` syntax (`[inject-error]` / `[set-state]` groups of
//! `key = "value"` lines) and node options (`inject-error.0.event=…`, what
//! a `json:{"inject-error": [{…}]}` file name flattens to). Errors carry
//! QEMU's messages, since qemu-io prints them after "can't open device".

use super::blkdebug::{Action, IoType, Rule};
use super::event::DebugEvent;
use crate::error::{Error, Result};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Group {
    InjectError,
    SetState,
}

impl Group {
    fn name(self) -> &'static str {
        match self {
            Group::InjectError => "inject-error",
            Group::SetState => "set-state",
        }
    }

    fn from_name(s: &str) -> Option<Group> {
        match s {
            "inject-error" => Some(Group::InjectError),
            "set-state" => Some(Group::SetState),
            _ => None,
        }
    }

    fn keys(self) -> &'static [&'static str] {
        match self {
            Group::InjectError => &[
                "event",
                "state",
                "iotype",
                "errno",
                "sector",
                "once",
                "immediately",
            ],
            Group::SetState => &["event", "state", "new_state"],
        }
    }
}

/// One `[group]` with its options, values checked for type.
struct Section {
    group: Group,
    opts: Vec<(String, String)>,
}

impl Section {
    fn get(&self, k: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    /// qemu_opt_set(): the key must exist, numbers and booleans must parse.
    fn set(&mut self, key: &str, value: &str, unknown: &dyn Fn(&str) -> String) -> Result<()> {
        if !self.group.keys().contains(&key) {
            return Err(Error::InvalidArgument(unknown(key)));
        }
        match key {
            "state" | "errno" | "sector" | "new_state" if parse_number(value).is_none() => {
                return Err(Error::InvalidArgument(format!(
                    "Parameter '{key}' expects a number"
                )));
            }
            "once" | "immediately" if parse_bool(value).is_none() => {
                return Err(Error::InvalidArgument(format!(
                    "Parameter '{key}' expects 'on' or 'off'"
                )));
            }
            _ => {}
        }
        self.opts.push((key.to_string(), value.to_string()));
        Ok(())
    }
}

/// qemu_strtou64() with base 0: decimal, 0x hex, leading-0 octal; a
/// leading minus wraps, as strtoull does.
fn parse_number(s: &str) -> Option<u64> {
    let (neg, t) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let v = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8).ok()?
    } else {
        t.parse().ok()?
    };
    Some(if neg { v.wrapping_neg() } else { v })
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// Splits off the first whitespace-delimited token (sscanf's `%s`).
fn token(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    (&s[..end], &s[end..])
}

/// `[name]` or `[name "id"]`: the group name.
fn group_header(line: &str) -> Option<&str> {
    let rest = line.strip_prefix('[')?;
    let (tok, after) = token(rest);
    if after.trim_start().starts_with('"') {
        return Some(tok);
    }
    let end = rest.find(']')?;
    (end > 0).then(|| &rest[..end])
}

/// `key = "value"` (sscanf's `%s = "%[^"]"`); any other line that starts
/// with a word sets that word to "", as QEMU's parser does.
fn assignment(line: &str) -> Option<(&str, &str)> {
    let (key, rest) = token(line);
    if key.is_empty() {
        return None;
    }
    let value = rest
        .trim_start()
        .strip_prefix('=')
        .map(str::trim_start)
        .and_then(|r| r.strip_prefix('"'))
        .and_then(|r| r.find('"').map(|i| &r[..i]))
        .unwrap_or("");
    Some((key, value))
}

fn parse_config(text: &str) -> Result<Vec<Section>> {
    let mut out: Vec<Section> = Vec::new();
    for line in text.split_inclusive('\n') {
        if line.starts_with('\n') || line.starts_with('#') {
            continue;
        }
        if let Some(g) = group_header(line) {
            let group = Group::from_name(g)
                .ok_or_else(|| Error::InvalidArgument(format!("There is no option group '{g}'")))?;
            out.push(Section {
                group,
                opts: Vec::new(),
            });
            continue;
        }
        let (key, value) =
            assignment(line).ok_or_else(|| Error::InvalidArgument("parse error".into()))?;
        let sec = out
            .last_mut()
            .ok_or_else(|| Error::InvalidArgument("no group defined".into()))?;
        sec.set(key, value, &|k| format!("Invalid parameter '{k}'"))?;
    }
    Ok(out)
}

/// The rule sections in node options (keys relative to the blkdebug node):
/// `inject-error.KEY=…` for one rule, `inject-error.N.KEY=…` for a list.
fn parse_options(opts: &[(String, String)]) -> Result<Vec<Section>> {
    let mut out = Vec::new();
    for group in [Group::InjectError, Group::SetState] {
        let prefix = format!("{}.", group.name());
        let mut sub: Vec<(String, String)> = Vec::new();
        for (k, v) in opts {
            if let Some(r) = k.strip_prefix(&prefix) {
                sub.retain(|(key, _)| key != r);
                sub.push((r.to_string(), v.clone()));
            }
        }
        if sub.is_empty() {
            continue;
        }
        let plain: Vec<_> = sub
            .iter()
            .filter(|(k, _)| group.keys().contains(&k.as_str()))
            .cloned()
            .collect();
        if !plain.is_empty() {
            let mut s = Section {
                group,
                opts: Vec::new(),
            };
            for (k, v) in &plain {
                s.set(k, v, &|k| format!("Invalid parameter '{k}'"))?;
            }
            out.push(s);
        }
        sub.retain(|(k, _)| !group.keys().contains(&k.as_str()));
        let mut n = 0;
        loop {
            let ip = format!("{n}.");
            let idx = n.to_string();
            if sub.iter().any(|(k, _)| *k == idx) {
                return Err(Error::InvalidArgument(format!(
                    "[{}] section (index {n}) does not consist of keys",
                    group.name()
                )));
            }
            let elem: Vec<_> = sub
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(&ip).map(|r| (r.to_string(), v.clone())))
                .collect();
            if elem.is_empty() {
                break;
            }
            sub.retain(|(k, _)| !k.starts_with(&ip));
            let mut s = Section {
                group,
                opts: Vec::new(),
            };
            let gname = group.name();
            for (k, v) in &elem {
                s.set(k, v, &|k| {
                    format!("[{gname}] section doesn't support the option '{k}'")
                })?;
            }
            out.push(s);
            n += 1;
        }
        if let Some((k, _)) = sub.first() {
            return Err(Error::InvalidArgument(format!(
                "Unused option '{k}' in [{}]",
                group.name()
            )));
        }
    }
    Ok(out)
}

fn rule(s: &Section) -> Result<Rule> {
    let name = s
        .get("event")
        .ok_or_else(|| Error::InvalidArgument("Missing event name for rule".into()))?;
    let event = DebugEvent::from_name(name)
        .ok_or_else(|| Error::InvalidArgument(format!("invalid parameter value: {name}")))?;
    let num = |k: &str| s.get(k).and_then(parse_number);
    let state = num("state").unwrap_or(0) as i64;
    let action = match s.group {
        Group::InjectError => {
            let iotypes = match s.get("iotype") {
                None => IoType::default_mask(),
                Some(t) => IoType::from_name(t)
                    .ok_or_else(|| Error::InvalidArgument(format!("invalid parameter value: {t}")))?
                    .mask(),
            };
            let sector = num("sector").map(|v| v as i64).unwrap_or(-1);
            Action::InjectError {
                errno: num("errno").map(|v| v as i32).unwrap_or(libc::EIO),
                once: s.get("once").and_then(parse_bool).unwrap_or(false),
                offset: (sector >= 0).then(|| sector as u64 * 512),
                iotypes,
            }
        }
        Group::SetState => Action::SetState(num("new_state").unwrap_or(0) as i64),
    };
    Ok(Rule {
        event,
        state,
        action,
    })
}

/// The rules of a blkdebug node: those of the config file (if any), then
/// those of the options, in the order QEMU adds them (every
/// `inject-error`, then every `set-state`).
pub fn load_rules(config: Option<&Path>, opts: &[(String, String)]) -> Result<Vec<Rule>> {
    let mut sections = Vec::new();
    if let Some(p) = config {
        let text =
            std::fs::read(p).map_err(|e| Error::io("Could not read blkdebug config file", e))?;
        sections = parse_config(&String::from_utf8_lossy(&text))?;
    }
    sections.extend(parse_options(opts)?);
    let mut rules = Vec::new();
    for g in [Group::InjectError, Group::SetState] {
        for s in sections.iter().filter(|s| s.group == g) {
            rules.push(rule(s)?);
        }
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(cfg: &str) -> Result<Vec<Rule>> {
        let mut rules = Vec::new();
        let sections = parse_config(cfg)?;
        for g in [Group::InjectError, Group::SetState] {
            for s in sections.iter().filter(|s| s.group == g) {
                rules.push(rule(s)?);
            }
        }
        Ok(rules)
    }

    fn msg(r: Result<Vec<Rule>>) -> String {
        r.unwrap_err().to_string()
    }

    fn opts(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn config_file_syntax() {
        let r = text(
            "# comment\n\n[set-state]\nevent = \"l2_load\"\nnew_state = \"2\"\n\
             [inject-error]\n  event = \"l2_update\"\nerrno = \"5\"\nimmediately = \"on\"\n\
             once = \"off\"\nsector = \"0x10\"\nstate = \"2\"\n",
        )
        .unwrap();
        assert_eq!(
            r,
            [
                Rule {
                    event: DebugEvent::L2Update,
                    state: 2,
                    action: Action::InjectError {
                        errno: 5,
                        once: false,
                        offset: Some(16 * 512),
                        iotypes: IoType::default_mask(),
                    },
                },
                Rule {
                    event: DebugEvent::L2Load,
                    state: 0,
                    action: Action::SetState(2),
                },
            ]
        );
    }

    #[test]
    fn defaults() {
        let r = text("[inject-error]\nevent = \"cor_write\"\niotype = \"write\"\n").unwrap();
        assert_eq!(
            r[0].action,
            Action::InjectError {
                errno: libc::EIO,
                once: false,
                offset: None,
                iotypes: IoType::Write.mask(),
            }
        );
    }

    #[test]
    fn qemu_messages_for_bad_config_files() {
        let cases = [
            (
                "[inject-error]\nevent = \"read_aio\"\nfoo = \"1\"\n",
                "Invalid parameter 'foo'",
            ),
            (
                "[inject-error]\nerrno = \"5\"\n",
                "Missing event name for rule",
            ),
            (
                "[inject-error]\nevent = \"read_aio\"\nerrno = \"x\"\n",
                "Parameter 'errno' expects a number",
            ),
            (
                "[inject-error]\nevent = \"read_aio\"\nonce = \"maybe\"\n",
                "Parameter 'once' expects 'on' or 'off'",
            ),
            (
                "[inject-error]\nevent = read_aio\n",
                "invalid parameter value: ",
            ),
            (
                "[inject-error]\nevent = \"l2_alloc.write\"\n",
                "invalid parameter value: l2_alloc.write",
            ),
            (
                "[bogus]\nevent = \"read_aio\"\n",
                "There is no option group 'bogus'",
            ),
            (
                "[inject-error]\nevent = \"read_aio\"\niotype = \"x\"\n",
                "invalid parameter value: x",
            ),
            ("event = \"read_aio\"\n", "no group defined"),
        ];
        for (cfg, want) in cases {
            assert_eq!(msg(text(cfg)), want, "{cfg}");
        }
    }

    #[test]
    fn options_single_and_list() {
        let r = load_rules(
            None,
            &opts(&[
                ("inject-error.0.event", "write_aio"),
                ("inject-error.0.errno", "28"),
                ("inject-error.0.once", "on"),
                ("inject-error.1.event", "l2_load"),
                ("set-state.event", "write_aio"),
                ("set-state.new_state", "2"),
                ("align", "512"),
            ]),
        )
        .unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].event, DebugEvent::WriteAio);
        assert!(matches!(
            r[0].action,
            Action::InjectError {
                errno: 28,
                once: true,
                ..
            }
        ));
        assert_eq!(r[1].event, DebugEvent::L2Load);
        assert_eq!(r[2].action, Action::SetState(2));
        let e = load_rules(
            None,
            &opts(&[
                ("inject-error.0.event", "read_aio"),
                ("inject-error.0.foo", "1"),
            ]),
        );
        assert_eq!(
            msg(e),
            "[inject-error] section doesn't support the option 'foo'"
        );
        let e = load_rules(None, &opts(&[("inject-error.foo", "1")]));
        assert_eq!(msg(e), "Unused option 'foo' in [inject-error]");
    }

    #[test]
    fn missing_config_file() {
        let e = load_rules(Some(Path::new("/nonexistent/blkdebug.conf")), &[]).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("Could not read blkdebug config file: No such file or directory"));
    }
}

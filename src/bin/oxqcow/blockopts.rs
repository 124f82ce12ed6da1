//! How QEMU tools name block devices beyond a plain file name: QemuOpts
//! strings (`--image-opts`, `-o`, qemu-io's `open -o`) and `json:{...}`
//! file names, both flattened into dotted option keys ("file.filename").
//! Shared by `oxqcow io` and the qemu-img commands, which then open the
//! graph the options describe with `io_open::open`.

/// Whether a name carries a protocol prefix ("nbd:…", "blkdebug::…").
pub fn protocol_of(name: &str) -> Option<&str> {
    let colon = name.find(':')?;
    let slash = name.find('/').unwrap_or(usize::MAX);
    if colon < slash && colon > 0 {
        let p = &name[..colon];
        if p.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Some(p);
        }
    }
    None
}

/// Whether a file name is really a block-layer specification (a
/// `json:{...}` name, or a protocol prefix such as "blkdebug::FILE" or
/// "nbd:..."), which `io_open::open` resolves, rather than a host file.
pub fn is_spec_name(name: &str) -> bool {
    name.starts_with("json:") || protocol_of(name).is_some()
}

/// Splits a QemuOpts string: `k=v,k2=v2`, ",," for a literal comma, a
/// bare key meaning "on". Returns the pairs in order.
pub fn parse_qemu_opts(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let b: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < b.len() {
        // key: up to '=' or ','
        let mut key = String::new();
        while i < b.len() && b[i] != '=' && b[i] != ',' {
            key.push(b[i]);
            i += 1;
        }
        let value = if i < b.len() && b[i] == '=' {
            i += 1;
            let mut v = String::new();
            while i < b.len() {
                if b[i] == ',' {
                    if i + 1 < b.len() && b[i + 1] == ',' {
                        v.push(',');
                        i += 2;
                        continue;
                    }
                    break;
                }
                v.push(b[i]);
                i += 1;
            }
            v
        } else {
            "on".to_string()
        };
        if i < b.len() && b[i] == ',' {
            i += 1;
        }
        if key.is_empty() {
            if value == "on" {
                continue;
            }
            return Err("Invalid parameter ''".to_string());
        }
        out.push((key, value));
    }
    Ok(out)
}

/// Flattens a `json:{...}` file name into dotted option keys (see
/// [`oxqcow::blockdev::parse_json`], which the engine also uses for
/// `json:` backing file names).
pub fn parse_json_filename(s: &str) -> Result<Vec<(String, String)>, String> {
    oxqcow::blockdev::parse_json(s)
}

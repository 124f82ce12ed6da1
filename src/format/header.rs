//! The qcow2 header (cluster 0): fixed fields, header extensions, the
//! feature name table and the backing file name.
//!
//! [`Header::parse`] applies every rule that needs only cluster 0 and the
//! file length, with QEMU's messages; [`Header::encode`] rebuilds cluster 0
//! the way QEMU's header writer does (fixed extension order, unknown
//! extensions and unknown header fields preserved). Neither does I/O.

use super::*;
use crate::error::{invalid, Error, Result};

/// Extension magics.
pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Size of the v2 header and of the v3 header QEMU writes today.
pub const V2_HEADER_LEN: usize = 72;
pub const V3_HEADER_LEN: usize = 112;

/// One entry of the feature name table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureEntry {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

/// The feature table QEMU 10 writes into every v3 image with clusters above 4 KiB.
pub fn standard_feature_table() -> Vec<FeatureEntry> {
    [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ]
    .iter()
    .map(|&(kind, bit, name)| FeatureEntry {
        kind,
        bit,
        name: name.to_string(),
    })
    .collect()
}

/// Everything cluster 0 holds, decoded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    /// Header bytes between QEMU's 112-byte struct and header_length, kept verbatim.
    pub unknown_header_fields: Vec<u8>,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    /// Crypto header pointer (offset, length).
    pub crypto_header: Option<(u64, u64)>,
    /// Raw bitmaps extension data.
    pub bitmaps_ext: Option<Vec<u8>>,
    /// The feature name table as found in the file.
    pub feature_table: Vec<FeatureEntry>,
    /// Unknown extensions, kept in QEMU's order (reversed on each parse, as
    /// QEMU's head-inserted list does).
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    /// The image uses 128-bit L2 entries with subclusters.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & super::INCOMPAT_EXTL2 != 0
    }

    /// Decodes cluster 0. `buf` holds the first bytes of the file (at most one
    /// cluster; shorter if the file is shorter).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN || be32(buf, 0) != QCOW_MAGIC {
            return Err(invalid!("Image is not in qcow2 format"));
        }
        let mut h = Header {
            version: be32(buf, 4),
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits: be32(buf, 20),
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            ..Default::default()
        };
        if h.version != 2 && h.version != 3 {
            return Err(Error::Unsupported(format!(
                "Unsupported qcow2 version {}",
                h.version
            )));
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
            return Err(invalid!("Unsupported cluster size: 2^{}", h.cluster_bits));
        }
        let cs = h.cluster_size() as usize;
        if h.version == 2 {
            h.refcount_order = 4;
            h.header_length = V2_HEADER_LEN as u32;
        } else {
            if buf.len() < 104 {
                return Err(invalid!("qcow2 header too short"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 {
                return Err(invalid!("qcow2 header too short"));
            }
            if h.header_length as usize > cs {
                return Err(invalid!("qcow2 header exceeds cluster size"));
            }
            if h.header_length as usize > buf.len() {
                return Err(invalid!("qcow2 header too short"));
            }
            if h.header_length > 104 {
                h.compression_type = buf[104];
            }
            if h.header_length as usize > V3_HEADER_LEN {
                h.unknown_header_fields = buf[V3_HEADER_LEN..h.header_length as usize].to_vec();
            }
        }
        check_compression_type(&h)?;
        if h.backing_file_offset > cs as u64 {
            return Err(invalid!("Invalid backing file offset"));
        }
        h.parse_extensions(buf)?;
        if h.incompatible_features & !INCOMPAT_KNOWN != 0 {
            return Err(Error::Unsupported(format!(
                "Unsupported qcow2 feature(s): {}",
                describe_unknown_incompat(&h.feature_table, h.incompatible_features)
            )));
        }
        if h.refcount_order > 6 {
            return Err(invalid!(
                "Reference count entry width too large; may not exceed 64 bits"
            ));
        }
        if h.crypt_method > 2 {
            return Err(Error::Unsupported(format!(
                "Unsupported encryption method {}",
                h.crypt_method
            )));
        }
        if h.backing_file_offset != 0 {
            let start = h.backing_file_offset as usize;
            let len = h.backing_file_size as usize;
            if len > 1023 || start + len > cs || start + len > buf.len() {
                return Err(invalid!("Backing file name too long"));
            }
            let name = &buf[start..start + len];
            h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }
        Ok(h)
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<()> {
        let cs = self.cluster_size() as usize;
        let end = if self.backing_file_offset != 0 {
            self.backing_file_offset as usize
        } else {
            cs
        }
        .min(buf.len());
        let mut off = self.header_length as usize;
        while off < end {
            if end - off < 8 {
                return Err(invalid!("Header extension too large"));
            }
            let magic = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            off += 8;
            if len > end - off {
                return Err(invalid!("Header extension too large"));
            }
            let data = &buf[off..off + len];
            match magic {
                EXT_END => return Ok(()),
                EXT_BACKING_FORMAT => {
                    if len >= 16 {
                        return Err(invalid!(
                            "ERROR: ext_backing_format: len={len} too large (>=16)"
                        ));
                    }
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_FEATURE_TABLE => self.feature_table = parse_feature_table(data),
                EXT_CRYPTO => {
                    if len != 16 {
                        return Err(invalid!("Invalid encryption header length"));
                    }
                    self.crypto_header = Some((be64(data, 0), be64(data, 8)));
                }
                EXT_BITMAPS => {
                    // Checked where QEMU checks it, before the extensions
                    // after it (a wrong length misreads those).
                    if len != super::bitmap::EXT_LEN {
                        return Err(invalid!("bitmaps_ext: Invalid extension length"));
                    }
                    self.bitmaps_ext = Some(data.to_vec())
                }
                EXT_DATA_FILE => self.data_file = Some(String::from_utf8_lossy(data).into_owned()),
                _ => self.unknown_extensions.insert(0, (magic, data.to_vec())),
            }
            off += (len + 7) & !7;
        }
        Ok(())
    }

    /// Rebuilds the whole of cluster 0, as QEMU's header writer does.
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.encode_with(true)
    }

    /// [`Header::encode`], without the feature name table when
    /// `feature_table` is false (the table only names bits for error
    /// messages): the most compact header with the same meaning.
    pub fn encode_with(&self, feature_table: bool) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; cs];
        let header_len = if self.version >= 3 {
            V3_HEADER_LEN + self.unknown_header_fields.len()
        } else {
            V2_HEADER_LEN
        };
        if header_len > cs {
            return Err(Error::NoSpace(
                "qcow2 header does not fit in cluster 0".into(),
            ));
        }
        put32(&mut b, 0, QCOW_MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        if self.version >= 3 {
            put64(&mut b, 72, self.incompatible_features);
            put64(&mut b, 80, self.compatible_features);
            put64(&mut b, 88, self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, header_len as u32);
            b[104] = self.compression_type;
            b[V3_HEADER_LEN..header_len].copy_from_slice(&self.unknown_header_fields);
        }
        let mut exts: Vec<(u32, Vec<u8>)> = Vec::new();
        if let Some(f) = &self.backing_format {
            exts.push((EXT_BACKING_FORMAT, f.as_bytes().to_vec()));
        }
        // As QEMU: the name is written only for an image that uses it.
        if let Some(f) = &self.data_file {
            if self.incompatible_features & INCOMPAT_DATA_FILE != 0 {
                exts.push((EXT_DATA_FILE, f.as_bytes().to_vec()));
            }
        }
        if let Some((o, l)) = self.crypto_header {
            let mut d = vec![0u8; 16];
            put64(&mut d, 0, o);
            put64(&mut d, 8, l);
            exts.push((EXT_CRYPTO, d));
        }
        if feature_table && self.version >= 3 && cs > 4096 {
            exts.push((
                EXT_FEATURE_TABLE,
                encode_feature_table(&standard_feature_table()),
            ));
        }
        if self.autoclear_features & AUTOCLEAR_BITMAPS != 0 {
            if let Some(d) = &self.bitmaps_ext {
                exts.push((EXT_BITMAPS, d.clone()));
            }
        }
        exts.extend(self.unknown_extensions.iter().cloned());
        let mut off = header_len;
        for (magic, data) in &exts {
            let padded = (data.len() + 7) & !7;
            if off + 8 + padded > cs {
                return Err(Error::NoSpace(
                    "header extensions do not fit in cluster 0".into(),
                ));
            }
            put32(&mut b, off, *magic);
            put32(&mut b, off + 4, data.len() as u32);
            b[off + 8..off + 8 + data.len()].copy_from_slice(data);
            off += 8 + padded;
        }
        if off + 8 > cs {
            return Err(Error::NoSpace(
                "header extensions do not fit in cluster 0".into(),
            ));
        }
        off += 8; // end marker (already zero)
        if let Some(name) = &self.backing_file {
            if off + name.len() > cs {
                return Err(Error::NoSpace(
                    "backing file name does not fit in cluster 0".into(),
                ));
            }
            b[off..off + name.len()].copy_from_slice(name.as_bytes());
            put64(&mut b, 8, off as u64);
            put32(&mut b, 16, name.len() as u32);
        }
        Ok(b)
    }
}

fn check_compression_type(h: &Header) -> Result<()> {
    let bit = h.incompatible_features & INCOMPAT_COMPRESSION != 0;
    if h.compression_type > 1 {
        return Err(invalid!(
            "qcow2: unknown compression type: {}",
            h.compression_type
        ));
    }
    if h.compression_type == 0 && bit {
        return Err(invalid!(
            "qcow2: Compression type incompatible feature bit must not be set"
        ));
    }
    if h.compression_type != 0 && !bit {
        return Err(invalid!(
            "qcow2: Compression type incompatible feature bit must be set"
        ));
    }
    Ok(())
}

/// Parses a feature table, tolerating a length that is not a multiple of 48
/// and stopping at the first entry with an empty name.
pub fn parse_feature_table(data: &[u8]) -> Vec<FeatureEntry> {
    let mut out = Vec::new();
    for chunk in data.chunks(48) {
        let mut e = [0u8; 48];
        e[..chunk.len()].copy_from_slice(chunk);
        if e[2] == 0 {
            break;
        }
        let name_bytes = &e[2..];
        let end = name_bytes.iter().position(|&c| c == 0).unwrap_or(46);
        out.push(FeatureEntry {
            kind: e[0],
            bit: e[1],
            name: String::from_utf8_lossy(&name_bytes[..end]).into_owned(),
        });
    }
    out
}

pub fn encode_feature_table(t: &[FeatureEntry]) -> Vec<u8> {
    let mut out = vec![0u8; t.len() * 48];
    for (i, e) in t.iter().enumerate() {
        let o = i * 48;
        out[o] = e.kind;
        out[o + 1] = e.bit;
        let n = e.name.as_bytes();
        let l = n.len().min(46);
        out[o + 2..o + 2 + l].copy_from_slice(&n[..l]);
    }
    out
}

/// QEMU's description of unsupported incompatible bits: the names from the
/// feature table in table order, then the hex mask of the unnamed rest.
pub fn describe_unknown_incompat(table: &[FeatureEntry], incompat: u64) -> String {
    let mut mask = incompat & !INCOMPAT_KNOWN;
    let mut parts = Vec::new();
    for e in table {
        if e.kind == 0 && e.bit < 64 && mask & (1u64 << e.bit) != 0 {
            parts.push(e.name.clone());
            mask &= !(1u64 << e.bit);
        }
    }
    if mask != 0 {
        parts.push(format!("Unknown incompatible feature: {mask:x}"));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 64 << 20,
            l1_size: 1,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            refcount_order: 4,
            header_length: 112,
            ..Default::default()
        }
    }

    #[test]
    fn roundtrip_with_backing_and_unknown_exts() {
        let mut h = sample();
        h.backing_file = Some("/some/backing/file/path".into());
        h.backing_format = Some("host_device".into());
        h.unknown_extensions = vec![(0x12345678, b"This is a test header extension".to_vec())];
        let b = h.encode().unwrap();
        // 112 + 24 + 392 + 40 + 8, as in iotest 031 with QEMU 10.
        assert_eq!(be64(&b, 8), 0x240);
        let p = Header::parse(&b).unwrap();
        assert_eq!(p.backing_file.as_deref(), Some("/some/backing/file/path"));
        assert_eq!(p.backing_format.as_deref(), Some("host_device"));
        assert_eq!(p.unknown_extensions, h.unknown_extensions);
        assert_eq!(p.feature_table, standard_feature_table());
    }

    #[test]
    fn unknown_extensions_reverse_on_each_rewrite() {
        let mut h = sample();
        h.unknown_extensions = vec![(0x11111111, vec![1]), (0x22222222, vec![2])];
        let p = Header::parse(&h.encode().unwrap()).unwrap();
        assert_eq!(p.unknown_extensions[0].0, 0x22222222);
    }

    #[test]
    fn unknown_incompatible_bits_are_named() {
        let table = parse_feature_table(b"\x00\x3fTest feature");
        assert_eq!(describe_unknown_incompat(&table, 1 << 63), "Test feature");
        assert_eq!(
            describe_unknown_incompat(&[], 0xe000000000000000),
            "Unknown incompatible feature: e000000000000000"
        );
        let mut h = sample();
        h.incompatible_features = 1 << 62;
        let e = Header::parse(&h.encode().unwrap()).unwrap_err().to_string();
        assert_eq!(
            e,
            "Unsupported qcow2 feature(s): Unknown incompatible feature: 4000000000000000"
        );
    }

    #[test]
    fn hostile_headers_are_refused() {
        let mut b = sample().encode().unwrap();
        put32(&mut b, 100, 1 << 20);
        assert_eq!(
            Header::parse(&b).unwrap_err().to_string(),
            "qcow2 header exceeds cluster size"
        );
        let mut b = sample().encode().unwrap();
        put32(&mut b, 20, 22);
        assert_eq!(
            Header::parse(&b).unwrap_err().to_string(),
            "Unsupported cluster size: 2^22"
        );
        let mut b = sample().encode().unwrap();
        put32(&mut b, 112, 0xabcdef01);
        put32(&mut b, 116, 0xffff_0000);
        assert_eq!(
            Header::parse(&b).unwrap_err().to_string(),
            "Header extension too large"
        );
        assert!(Header::parse(&b[..50]).is_err());
    }

    #[test]
    fn data_file_name_is_kept_only_with_the_feature_bit() {
        let mut h = sample();
        h.data_file = Some("d.raw".into());
        let parsed = Header::parse(&h.encode().unwrap()).unwrap();
        assert_eq!(parsed.data_file, None);
        h.incompatible_features |= INCOMPAT_DATA_FILE;
        let parsed = Header::parse(&h.encode().unwrap()).unwrap();
        assert_eq!(parsed.data_file.as_deref(), Some("d.raw"));
    }
}

//! Encrypted images in the engine: checking the header's encryption fields
//! and unlocking the key at open, setting encryption up at creation, and
//! the sector-aligned read and write of encrypted data clusters.
//!
//! Only uncompressed data clusters are encrypted. Compressed clusters are
//! stored in the clear, as QEMU stores them (its `write -c` on an
//! encrypted image does so; `convert -c` refuses the combination). Cipher
//! details and which sector number feeds the IV live in `crate::crypto`.

use super::{OpenOptions, Qcow2};
use crate::crypto::{
    DataCipher, EncryptCreate, Encryption, Format, LuksHeader, CRYPT_AES, CRYPT_LUKS,
};
use crate::error::{Error, Result};
use crate::format::header::Header;
use crate::storage::Storage;

const SECTOR: u64 = 512;

/// Checks the header's encryption fields against the open options and,
/// unless the open is metadata only, unlocks the data cipher.
pub(super) fn open_encryption(
    file: &dyn Storage,
    header: &Header,
    file_len: u64,
    opts: &OpenOptions,
) -> Result<(Option<Encryption>, Option<DataCipher>)> {
    let cs = header.cluster_size();
    if let Some((off, _)) = header.crypto_header {
        if header.crypt_method != CRYPT_LUKS {
            return Err(Error::Invalid(
                "CRYPTO header extension only expected with LUKS encryption method".into(),
            ));
        }
        if off % cs != 0 {
            return Err(Error::Invalid(format!(
                "Encryption header offset '{off}' is not a multiple of cluster size '{cs}'"
            )));
        }
    }
    let found = match header.crypt_method {
        0 => None,
        CRYPT_AES => Some(Format::Aes),
        CRYPT_LUKS => Some(Format::Luks),
        m => {
            return Err(Error::Unsupported(format!(
                "Unsupported encryption method {m}"
            )))
        }
    };
    if found == Some(Format::Luks) && header.crypto_header.is_none() {
        return Err(Error::Invalid(
            "Missing CRYPTO header for crypt method 2".into(),
        ));
    }
    match (found, opts.encrypt_format) {
        (None, Some(want)) => {
            return Err(Error::InvalidArgument(format!(
                "No encryption in image header, but options specified format '{}'",
                want.name()
            )))
        }
        (Some(have), Some(want)) if have != want => {
            return Err(Error::InvalidArgument(format!(
                "Header reported '{}' encryption format but options specify '{}'",
                have.name(),
                want.name()
            )))
        }
        (None, None) => return Ok((None, None)),
        _ => {}
    }
    let password = match (&opts.key_secret, opts.metadata_only) {
        (Some(p), _) => Some(p.0.as_slice()),
        (None, true) => None,
        (None, false) => {
            return Err(Error::InvalidArgument(
                "Parameter 'encrypt.key-secret' is required for cipher".into(),
            ))
        }
    };
    if found == Some(Format::Aes) {
        let cipher = match password {
            Some(p) if !opts.metadata_only => Some(DataCipher::legacy_aes(p)?),
            _ => None,
        };
        return Ok((Some(Encryption::Aes), cipher));
    }
    let (area_off, area_len) = header.crypto_header.unwrap_or((0, 0));
    // Reads inside the header area; past the end of the file reads zeros,
    // as a hole would.
    let mut read = |buf: &mut [u8], off: u64| -> Result<()> {
        if off
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > area_len)
        {
            return Err(Error::Invalid(
                "Request for data outside of extension header".into(),
            ));
        }
        let start = area_off.saturating_add(off);
        buf.fill(0);
        if start < file_len {
            let n = ((file_len - start) as usize).min(buf.len());
            file.read_at(&mut buf[..n], start)
                .map_err(|e| Error::io("Could not read encryption header", e))?;
        }
        Ok(())
    };
    let mut hb = vec![0u8; crate::crypto::luks::HEADER_LEN];
    read(&mut hb, 0)?;
    let luks = LuksHeader::parse(&hb)?;
    let cipher = match password {
        Some(p) if !opts.metadata_only => {
            let master = luks.unlock(p, &mut read)?;
            Some(DataCipher::luks(&luks, &master)?)
        }
        _ => None,
    };
    Ok((Some(Encryption::Luks(Box::new(luks))), cipher))
}

impl Qcow2 {
    /// Refuses guest data I/O on an encrypted image opened without its key.
    pub(super) fn check_data_io(&self) -> Result<()> {
        if self.encryption.is_some() && self.cipher.is_none() {
            return Err(Error::Key(format!(
                "{}: the image is encrypted and was opened without its key",
                self.name
            )));
        }
        Ok(())
    }

    /// Reads guest bytes stored in a data cluster at host offset `host`
    /// (guest offset `guest`), decrypting when the image is encrypted.
    pub(super) fn read_data(&self, out: &mut [u8], host: u64, guest: u64) -> Result<()> {
        let io = |e| Error::io(format!("{}: read", self.name), e);
        let Some(c) = &self.cipher else {
            return self.data_storage().read_at(out, host).map_err(io);
        };
        let head = host % SECTOR;
        let a = host - head;
        let end = (host + out.len() as u64).div_ceil(SECTOR) * SECTOR;
        let mut buf = vec![0u8; (end - a) as usize];
        self.data_storage().read_at(&mut buf, a).map_err(io)?;
        c.decrypt(a, guest - head, &mut buf);
        out.copy_from_slice(&buf[head as usize..head as usize + out.len()]);
        Ok(())
    }

    /// For a write of [start, end) of a cluster, the sector-aligned range
    /// the write must cover when the image is encrypted.
    pub(super) fn crypt_span(&self, start: u64, end: u64) -> (u64, u64) {
        if self.cipher.is_some() {
            (start / SECTOR * SECTOR, end.div_ceil(SECTOR) * SECTOR)
        } else {
            (start, end)
        }
    }

    /// `buf` (whole sectors) as it is stored at host offset `host` for
    /// guest offset `guest`: encrypted when the image is.
    pub(super) fn stored_form<'a>(
        &self,
        buf: &'a [u8],
        host: u64,
        guest: u64,
    ) -> std::borrow::Cow<'a, [u8]> {
        match &self.cipher {
            None => std::borrow::Cow::Borrowed(buf),
            Some(c) => {
                let mut b = buf.to_vec();
                c.encrypt(host, guest, &mut b);
                std::borrow::Cow::Owned(b)
            }
        }
    }

    /// Writes `buf` (whole sectors when encrypted) at host offset `host`
    /// holding guest bytes from `guest`, encrypting it first.
    pub(super) fn write_data_at(&self, buf: &[u8], host: u64, guest: u64) -> Result<()> {
        self.pwrite(&self.stored_form(buf, host, guest), host)
    }

    /// Sets up encryption on a freshly created image (QEMU does it after
    /// the size, preallocation and backing file): LUKS allocates clusters
    /// for the header and key material and points the crypto header
    /// extension at them; legacy AES only sets `crypt_method`.
    pub(super) fn set_up_encryption(&self, e: &EncryptCreate) -> Result<()> {
        let mut m = self.quiesce();
        if e.method == CRYPT_LUKS {
            let (_, area, _) = LuksHeader::create(e.spec, e.hash, &e.password.0, e.iter_time_ms)?;
            let len = area.len() as u64;
            let clusters = len.div_ceil(self.cs);
            let off = m.alloc_clusters(clusters)?;
            let mut padded = area;
            padded.resize((clusters * self.cs) as usize, 0);
            m.write_file(&padded, off, "write encryption header")?;
            m.flush()?;
            m.header.crypto_header = Some((off, len));
        }
        m.header.crypt_method = e.method;
        m.write_header()?;
        m.sync()?;
        m.rebuild_metadata_map();
        drop(m);
        self.file_end.fetch_max(
            self.file.len().map_err(|e| Error::io("stat", e))?,
            std::sync::atomic::Ordering::AcqRel,
        );
        Ok(())
    }
}

//! A small zip reader (and stored-only writer) for `.npz` and torch `.pth` files.
//!
//! Reads the central directory (zip64 end-of-central-directory records included),
//! entries stored (method 0) or deflated (method 8), with or without the
//! data-descriptor flag (bit 3, as torch's writer sets with flags 0x808). Every read is
//! checked against the central directory's CRC-32, so a corrupt or truncated archive
//! gives an error naming the archive and the entry instead of garbage.
//!
//! ```no_run
//! let zip = demovlp_formats::zip::ZipArchive::open("model.pth".as_ref())?;
//! for e in zip.entries() { println!("{} {}", e.name, e.uncompressed_size); }
//! let pkl = zip.read("archive/data.pkl")?;
//! # anyhow::Ok(())
//! ```

use std::borrow::Cow;
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const EOCD64_LOCATOR_SIG: u32 = 0x0706_4b50;

/// Compression methods this reader understands.
pub const METHOD_STORED: u16 = 0;
pub const METHOD_DEFLATED: u16 = 8;

/// One entry of the central directory.
#[derive(Clone, Debug)]
pub struct ZipEntry {
    pub name: String,
    /// 0 = stored, 8 = deflated (others are refused on read).
    pub method: u16,
    /// General-purpose bit flags (bit 0 = encrypted, bit 3 = data descriptor, bit 11 = UTF-8).
    pub flags: u16,
    pub crc32: u32,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    /// Offset of the entry's local header from the start of the archive.
    pub local_header_offset: u64,
}

/// Bytes backing an archive: a memory map of a file, or an owned buffer.
enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A read-only zip archive held in memory (or memory-mapped).
pub struct ZipArchive {
    /// Shown in every error (usually the file path).
    pub label: String,
    data: Backing,
    entries: Vec<ZipEntry>,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

impl ZipArchive {
    /// Memory-maps `path` and reads its central directory.
    pub fn open(path: &Path) -> Result<ZipArchive> {
        let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        // Safety: read-only map; the file is not expected to change while we read it.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("{}: cannot memory-map", path.display()))?;
        Self::from_backing(Backing::Mmap(map), path.display().to_string())
    }

    /// Reads `path` fully into memory (cheaper than a map for many small files).
    pub fn open_read(path: &Path) -> Result<ZipArchive> {
        let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        Self::from_backing(Backing::Owned(bytes), path.display().to_string())
    }

    /// Parses an archive held in `bytes`; `label` names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, label: &str) -> Result<ZipArchive> {
        Self::from_backing(Backing::Owned(bytes), label.to_string())
    }

    fn from_backing(data: Backing, label: String) -> Result<ZipArchive> {
        let entries = read_central_directory(data.bytes()).with_context(|| format!("{label}: not a readable zip archive"))?;
        Ok(ZipArchive { label, data, entries })
    }

    /// All entries, in central-directory order.
    pub fn entries(&self) -> &[ZipEntry] {
        &self.entries
    }

    /// The entry called `name`, if any.
    pub fn entry(&self, name: &str) -> Option<&ZipEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// The whole archive's bytes.
    pub fn raw(&self) -> &[u8] {
        self.data.bytes()
    }

    /// The entry's bytes as stored in the archive (compressed if deflated).
    pub fn raw_entry_data(&self, e: &ZipEntry) -> Result<&[u8]> {
        let b = self.data.bytes();
        let lho = e.local_header_offset as usize;
        let ctx = || format!("{}: entry {:?}", self.label, e.name);
        if lho.checked_add(30).is_none_or(|end| end > b.len()) || u32_at(b, lho) != LOCAL_SIG {
            bail!("{}: local header missing or corrupt (archive truncated?)", ctx());
        }
        // The local header's own name/extra lengths decide where data starts; its size
        // fields may be zero when a data descriptor follows, so sizes come from the
        // central directory.
        let start = lho + 30 + u16_at(b, lho + 26) as usize + u16_at(b, lho + 28) as usize;
        let end = start
            .checked_add(e.compressed_size as usize)
            .filter(|&end| end <= b.len())
            .with_context(|| format!("{}: data runs past the end of the archive (truncated?)", ctx()))?;
        Ok(&b[start..end])
    }

    /// The uncompressed bytes of entry `name`; borrowed without copying when stored.
    /// Errors name the archive and the entry: missing, unsupported method, encrypted,
    /// truncated, bad deflate stream, size or CRC-32 mismatch.
    pub fn read(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let e = self.entry(name).with_context(|| format!("{}: no entry {name:?} (entries: {})", self.label, self.names_preview()))?;
        self.read_entry(e)
    }

    /// Like [`read`](Self::read) for an entry obtained from [`entries`](Self::entries).
    pub fn read_entry(&self, e: &ZipEntry) -> Result<Cow<'_, [u8]>> {
        let ctx = || format!("{}: entry {:?}", self.label, e.name);
        if e.flags & 1 != 0 {
            bail!("{}: encrypted entries are not supported", ctx());
        }
        let raw = self.raw_entry_data(e)?;
        let out: Cow<[u8]> = match e.method {
            METHOD_STORED => Cow::Borrowed(raw),
            METHOD_DEFLATED => {
                let mut v = Vec::with_capacity(e.uncompressed_size as usize);
                flate2::read::DeflateDecoder::new(raw).read_to_end(&mut v).with_context(|| format!("{}: corrupt deflate stream", ctx()))?;
                Cow::Owned(v)
            }
            m => bail!("{}: compression method {m} not supported (only stored and deflated)", ctx()),
        };
        if out.len() as u64 != e.uncompressed_size {
            bail!("{}: expected {} bytes after decompression, got {} (corrupt archive)", ctx(), e.uncompressed_size, out.len());
        }
        let mut crc = flate2::Crc::new();
        crc.update(&out);
        if crc.sum() != e.crc32 {
            bail!("{}: CRC-32 mismatch (corrupt archive)", ctx());
        }
        Ok(out)
    }

    fn names_preview(&self) -> String {
        let names: Vec<&str> = self.entries.iter().take(8).map(|e| e.name.as_str()).collect();
        let more = if self.entries.len() > 8 { ", ..." } else { "" };
        format!("{}{more}", names.join(", "))
    }
}

/// Finds the end-of-central-directory record (zip64 when present) and parses every entry.
fn read_central_directory(b: &[u8]) -> Result<Vec<ZipEntry>> {
    if b.len() < 22 {
        bail!("file is {} bytes, too short for a zip archive", b.len());
    }
    // The EOCD record is 22 bytes plus a comment of up to 65535 bytes at the very end.
    let lowest = b.len().saturating_sub(22 + 65535);
    let eocd = (lowest..=b.len() - 22)
        .rev()
        .find(|&i| u32_at(b, i) == EOCD_SIG && i + 22 + u16_at(b, i + 20) as usize <= b.len())
        .context("no end-of-central-directory record (truncated or not a zip)")?;
    let mut count = u16_at(b, eocd + 10) as u64;
    let mut cd_size = u32_at(b, eocd + 12) as u64;
    let mut cd_offset = u32_at(b, eocd + 16) as u64;
    // A zip64 locator sits just before the EOCD; torch writes one even for small files.
    if eocd >= 20 && u32_at(b, eocd - 20) == EOCD64_LOCATOR_SIG {
        let off = u64_at(b, eocd - 20 + 8) as usize;
        if off.checked_add(56).is_none_or(|e| e > b.len()) || u32_at(b, off) != EOCD64_SIG {
            bail!("zip64 end-of-central-directory record missing at offset {off}");
        }
        count = u64_at(b, off + 32);
        cd_size = u64_at(b, off + 40);
        cd_offset = u64_at(b, off + 48);
    }
    let cd_end = cd_offset
        .checked_add(cd_size)
        .filter(|&e| e <= b.len() as u64)
        .with_context(|| format!("central directory (offset {cd_offset}, {cd_size} bytes) lies past the end of the file"))?;
    let mut entries = Vec::with_capacity(count as usize);
    let mut p = cd_offset as usize;
    for i in 0..count {
        if p + 46 > cd_end as usize || u32_at(b, p) != CENTRAL_SIG {
            bail!("central directory entry {i} at offset {p} is corrupt");
        }
        let name_len = u16_at(b, p + 28) as usize;
        let extra_len = u16_at(b, p + 30) as usize;
        let comment_len = u16_at(b, p + 32) as usize;
        let next = p + 46 + name_len + extra_len + comment_len;
        if next > cd_end as usize {
            bail!("central directory entry {i} runs past the directory's end");
        }
        let name = String::from_utf8_lossy(&b[p + 46..p + 46 + name_len]).into_owned();
        let mut e = ZipEntry {
            name,
            flags: u16_at(b, p + 8),
            method: u16_at(b, p + 10),
            crc32: u32_at(b, p + 16),
            compressed_size: u32_at(b, p + 20) as u64,
            uncompressed_size: u32_at(b, p + 24) as u64,
            local_header_offset: u32_at(b, p + 42) as u64,
        };
        // Zip64 extended information: 64-bit values for exactly those fields saturated
        // at 0xFFFFFFFF, in the order uncompressed, compressed, offset.
        let mut x = p + 46 + name_len;
        let extra_end = x + extra_len;
        while x + 4 <= extra_end {
            let id = u16_at(b, x);
            let len = u16_at(b, x + 2) as usize;
            let mut q = x + 4;
            let field_end = (q + len).min(extra_end);
            if id == 0x0001 {
                for field in [&mut e.uncompressed_size, &mut e.compressed_size, &mut e.local_header_offset] {
                    if *field == 0xFFFF_FFFF && q + 8 <= field_end {
                        *field = u64_at(b, q);
                        q += 8;
                    }
                }
            }
            x += 4 + len;
        }
        entries.push(e);
        p = next;
    }
    Ok(entries)
}

/// Writes a zip archive of stored (uncompressed) entries, as `np.savez` does.
/// Offsets are 32-bit (archives up to 4 GiB), which is all the tests and demo need.
pub fn write_stored<W: Write>(out: &mut W, entries: &[(&str, &[u8])]) -> Result<()> {
    write_zip(out, entries, false)
}

/// Writes a zip archive, entries deflated when `deflate` (as `np.savez_compressed`).
pub fn write_zip<W: Write>(out: &mut W, entries: &[(&str, &[u8])], deflate: bool) -> Result<()> {
    let mut central = Vec::new();
    let mut offset: u64 = 0;
    let method = if deflate { METHOD_DEFLATED } else { METHOD_STORED };
    for (name, raw) in entries {
        let mut crc = flate2::Crc::new();
        crc.update(raw);
        let crc = crc.sum();
        let packed;
        let data: &[u8] = if deflate {
            let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(raw)?;
            packed = enc.finish()?;
            &packed
        } else {
            raw
        };
        if offset + data.len() as u64 + 30 + name.len() as u64 > u32::MAX as u64 {
            bail!("write_stored: archive would exceed 4 GiB (zip64 writing not supported)");
        }
        let mut local = Vec::with_capacity(30 + name.len());
        local.extend_from_slice(&LOCAL_SIG.to_le_bytes());
        local.extend_from_slice(&20u16.to_le_bytes()); // version needed
        local.extend_from_slice(&0x0800u16.to_le_bytes()); // UTF-8 names
        local.extend_from_slice(&method.to_le_bytes());
        local.extend_from_slice(&[0, 0, 0x21, 0]); // time 00:00, date 1980-01-01
        local.extend_from_slice(&crc.to_le_bytes());
        local.extend_from_slice(&(data.len() as u32).to_le_bytes());
        local.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        local.extend_from_slice(&(name.len() as u16).to_le_bytes());
        local.extend_from_slice(&0u16.to_le_bytes());
        local.extend_from_slice(name.as_bytes());
        out.write_all(&local)?;
        out.write_all(data)?;

        central.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes()); // made by
        central.extend_from_slice(&20u16.to_le_bytes()); // needed
        central.extend_from_slice(&0x0800u16.to_le_bytes());
        central.extend_from_slice(&method.to_le_bytes());
        central.extend_from_slice(&[0, 0, 0x21, 0]);
        central.extend_from_slice(&crc.to_le_bytes());
        central.extend_from_slice(&(data.len() as u32).to_le_bytes());
        central.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        central.extend_from_slice(&(name.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 8]); // extra, comment, disk, internal attrs
        central.extend_from_slice(&0u32.to_le_bytes()); // external attrs
        central.extend_from_slice(&(offset as u32).to_le_bytes());
        central.extend_from_slice(name.as_bytes());
        offset += local.len() as u64 + data.len() as u64;
    }
    out.write_all(&central)?;
    let mut eocd = Vec::with_capacity(22);
    eocd.extend_from_slice(&EOCD_SIG.to_le_bytes());
    eocd.extend_from_slice(&[0; 4]);
    eocd.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    eocd.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    eocd.extend_from_slice(&(central.len() as u32).to_le_bytes());
    eocd.extend_from_slice(&(offset as u32).to_le_bytes());
    eocd.extend_from_slice(&0u16.to_le_bytes());
    out.write_all(&eocd)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_round_trip_and_corruption_detected() {
        let mut buf = Vec::new();
        write_stored(&mut buf, &[("a.bin", b"hello"), ("dir/b.bin", &[1, 2, 3, 4])]).unwrap();
        let z = ZipArchive::from_bytes(buf.clone(), "mem").unwrap();
        assert_eq!(z.entries().len(), 2);
        let mut deflated = Vec::new();
        let big = vec![7u8; 5000];
        write_zip(&mut deflated, &[("big", &big), ("a.bin", b"hello")], true).unwrap();
        let zd = ZipArchive::from_bytes(deflated, "deflated").unwrap();
        assert_eq!(zd.entries()[0].method, METHOD_DEFLATED);
        assert!(zd.entries()[0].compressed_size < 100);
        assert_eq!(&*zd.read("big").unwrap(), &big[..]);
        assert_eq!(&*zd.read("a.bin").unwrap(), b"hello");
        assert_eq!(&*z.read("a.bin").unwrap(), b"hello");
        assert_eq!(&*z.read("dir/b.bin").unwrap(), &[1, 2, 3, 4]);
        let err = z.read("nope").unwrap_err().to_string();
        assert!(err.contains("mem") && err.contains("nope"), "{err}");

        // Flip one data byte: the CRC must catch it.
        let mut bad = buf.clone();
        let pos = bad.windows(5).position(|w| w == b"hello").unwrap();
        bad[pos] = b'j';
        let z = ZipArchive::from_bytes(bad, "bad").unwrap();
        let err = format!("{:#}", z.read("a.bin").unwrap_err());
        assert!(err.contains("CRC"), "{err}");

        // Truncation loses the end-of-central-directory record.
        let cut = buf[..buf.len() - 10].to_vec();
        let err = format!("{:#}", ZipArchive::from_bytes(cut, "cut.npz").err().unwrap());
        assert!(err.contains("cut.npz") && err.contains("end-of-central-directory"), "{err}");
    }
}

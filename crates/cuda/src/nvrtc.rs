//! Run-time compilation of the kernel sources with NVRTC to a CUBIN for one architecture,
//! cached on disk keyed by source, options and NVRTC version (no nvcc at build time).
//!
//! Cache directory: `$DEMOVLP_CUDA_CACHE`, else `$XDG_CACHE_HOME/demovlp/cuda`, else
//! `~/.cache/demovlp/cuda`; a cache that cannot be written is skipped (compiled every time).

use crate::libs::{require, Lib};
use cudarc::nvrtc::{result, sys};
use std::ffi::CString;
use std::path::PathBuf;

/// NVRTC's version (major, minor); `Err` when libnvrtc cannot be opened.
pub fn version() -> Result<(i32, i32), String> {
    require(&[Lib::Nvrtc])?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| format!("nvrtcVersion: {e:?}"))?;
    Ok((major, minor))
}

/// The options every kernel is compiled with for `arch` (e.g. `sm_90`): `fmad` false (the
/// fp32 parity mode) forbids contracting a·b + c into one rounding, closer to the CPU
/// kernels; true (the bf16 speed mode) allows it. `-lineinfo`: compute-sanitizer and Nsight
/// Compute point at source lines of `kernels/*.cu`.
pub fn options(arch: &str, fmad: bool) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), format!("--fmad={fmad}"), "-lineinfo".into(), "--std=c++17".into()]
}

/// 64-bit FNV-1a (stable across builds, unlike std's hasher).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DEMOVLP_CUDA_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("demovlp/cuda"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/demovlp/cuda"))
}

/// Compiles `source` (module `name`) to a CUBIN for `arch` with NVRTC alone (no GPU needed).
pub fn compile_cubin(name: &str, source: &str, arch: &str, fmad: bool) -> Result<Vec<u8>, String> {
    require(&[Lib::Nvrtc])?;
    let src = CString::new(source).map_err(|_| format!("{name}: NUL in the source"))?;
    let cname = CString::new(format!("{name}.cu")).unwrap();
    let prog = result::create_program(&src, Some(&cname)).map_err(|e| format!("{name}: nvrtcCreateProgram: {e:?}"))?;
    let opts = options(arch, fmad);
    // SAFETY: `prog` is a live program until destroyed below; the out buffers are sized by NVRTC.
    unsafe {
        let compiled = result::compile_program(prog, &opts);
        let log = result::get_program_log(prog).map(|l| {
            let bytes: Vec<u8> = l.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        });
        let out = match compiled {
            Err(e) => Err(format!("{name} for {arch}: NVRTC failed ({e:?}):\n{}", log.unwrap_or_default())),
            Ok(()) => {
                let mut size = 0usize;
                sys::nvrtcGetCUBINSize(prog, &mut size).result().map_err(|e| format!("{name}: nvrtcGetCUBINSize: {e:?}"))?;
                let mut cubin = vec![0u8; size];
                sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _).result().map_err(|e| format!("{name}: nvrtcGetCUBIN: {e:?}"))?;
                if size == 0 {
                    Err(format!("{name} for {arch}: NVRTC produced no CUBIN"))
                } else {
                    Ok(cubin)
                }
            }
        };
        let _ = result::destroy_program(prog);
        out
    }
}

/// [`compile_cubin`] through the disk cache: the key covers the source, the options and
/// the NVRTC version. Returns the CUBIN and whether it came from the cache.
pub fn cubin_cached(name: &str, source: &str, arch: &str, fmad: bool) -> Result<(Vec<u8>, bool), String> {
    let (major, minor) = version()?;
    let opts = options(arch, fmad).join(" ");
    let ver = format!("{major}.{minor}");
    let key = fnv1a(&[source.as_bytes(), opts.as_bytes(), ver.as_bytes()]);
    let path = cache_dir().map(|d| d.join(format!("{name}-{arch}-{key:016x}.cubin")));
    if let Some(p) = &path {
        if let Ok(bytes) = std::fs::read(p) {
            if bytes.starts_with(b"\x7fELF") {
                return Ok((bytes, true));
            }
        }
    }
    let cubin = compile_cubin(name, source, arch, fmad)?;
    if let Some(p) = &path {
        // Best effort: write to a temporary name, then rename (concurrent runs stay safe).
        if let Some(dir) = p.parent() {
            if std::fs::create_dir_all(dir).is_ok() {
                let tmp = p.with_extension(format!("tmp{}", std::process::id()));
                if std::fs::write(&tmp, &cubin).is_ok() {
                    let _ = std::fs::rename(&tmp, p);
                }
            }
        }
    }
    Ok((cubin, false))
}

/// The file name of a prebuilt CUBIN: keyed by source and options (not by NVRTC version:
/// the machine that loads it may have no NVRTC).
pub fn prebuilt_name(name: &str, source: &str, arch: &str, fmad: bool) -> String {
    let opts = options(arch, fmad).join(" ");
    format!("prebuilt-{name}-{arch}-{:016x}.cubin", fnv1a(&[source.as_bytes(), opts.as_bytes()]))
}

/// Where prebuilt CUBINs are looked for: `$DEMOVLP_CUDA_KERNELS` (`:`-separated), a
/// `cuda-kernels/` folder next to the executable, the NVRTC cache directory.
pub fn prebuilt_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var("DEMOVLP_CUDA_KERNELS")
        .map(|v| v.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect())
        .unwrap_or_default();
    if let Some(d) = std::env::current_exe().ok().and_then(|e| e.parent().map(|p| p.join("cuda-kernels"))) {
        dirs.push(d);
    }
    dirs.extend(cache_dir());
    dirs
}

/// Compiles every kernel source for each of `archs`, in both modes (fmad off and on), into
/// `dir` as prebuilt CUBINs (needs NVRTC, no GPU); returns the files written.
pub fn write_prebuilt(dir: &std::path::Path, archs: &[&str]) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for arch in archs {
        for (name, src) in crate::SOURCES {
            for fmad in [false, true] {
                let cubin = compile_cubin(name, src, arch, fmad)?;
                let p = dir.join(prebuilt_name(name, src, arch, fmad));
                std::fs::write(&p, cubin).map_err(|e| format!("{}: {e}", p.display()))?;
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// The CUBIN of one kernel source for `arch`: compiled by NVRTC (through the disk cache)
/// when libnvrtc is present, else a prebuilt one ([`prebuilt_dirs`]); `Err` says how to
/// provide either.
pub fn cubin_for(name: &str, source: &str, arch: &str, fmad: bool) -> Result<Vec<u8>, String> {
    if Lib::Nvrtc.present() {
        return cubin_cached(name, source, arch, fmad).map(|(c, _)| c);
    }
    let file = prebuilt_name(name, source, arch, fmad);
    for d in prebuilt_dirs() {
        if let Ok(bytes) = std::fs::read(d.join(&file)) {
            if bytes.starts_with(b"\x7fELF") {
                return Ok(bytes);
            }
        }
    }
    Err(format!(
        "libnvrtc not found and no prebuilt {file} (looked in {:?}): {}; or write them where NVRTC is available (no GPU needed) \
         with `demovlp_cuda::nvrtc::write_prebuilt` and set DEMOVLP_CUDA_KERNELS=DIR",
        prebuilt_dirs(),
        crate::LIBRARY_HINT
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn cache_key_is_stable() {
        assert_eq!(super::fnv1a(&[b"a", b"b"]), super::fnv1a(&[b"a", b"b"]));
        assert_ne!(super::fnv1a(&[b"ab", b""]), super::fnv1a(&[b"a", b"b"]));
    }
}

//! Every kernel source compiles with NVRTC alone (no GPU) to a CUBIN for sm_80 (A100) and
//! sm_90 (H100/H200). Needs libnvrtc on the library path (e.g. the `nvidia-cuda-nvrtc-cu12`
//! wheel's `nvidia/cuda_nvrtc/lib`); without it the test prints a notice and passes, unless
//! `CI` is set, where it fails.
#![cfg(feature = "cuda")]

use demovlp_cuda::{libs::Lib, nvrtc, SOURCES};

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !Lib::Nvrtc.present() {
        let msg = format!("libnvrtc not found: {}", demovlp_cuda::LIBRARY_HINT);
        if std::env::var_os("CI").is_some() {
            panic!("{msg}");
        }
        eprintln!("notice: skipping the NVRTC compile test: {msg}");
        return;
    }
    let (major, minor) = nvrtc::version().unwrap();
    eprintln!("NVRTC {major}.{minor}");
    for arch in ["sm_80", "sm_90"] {
        for (name, src) in SOURCES {
            let cubin = nvrtc::compile_cubin(name, src, arch, false).unwrap_or_else(|e| panic!("{e}"));
            assert!(cubin.starts_with(b"\x7fELF"), "{name} for {arch}: not an ELF CUBIN");
            let text = String::from_utf8_lossy(&cubin);
            for kernel in demovlp_cuda::kernel_names(src) {
                assert!(text.contains(kernel), "{name} for {arch}: kernel {kernel} missing from the CUBIN");
            }
            eprintln!("{name} for {arch}: {} bytes, {} kernels", cubin.len(), demovlp_cuda::kernel_names(src).len());
        }
    }
    // The disk cache: a second lookup hits.
    let dir = std::env::temp_dir().join(format!("demovlp-nvrtc-cache-{}", std::process::id()));
    std::env::set_var("DEMOVLP_CUDA_CACHE", &dir);
    let (a, hit_a) = nvrtc::cubin_cached("heads", SOURCES[4].1, "sm_90", false).unwrap();
    let (b, hit_b) = nvrtc::cubin_cached("heads", SOURCES[4].1, "sm_90", false).unwrap();
    assert!(!hit_a && hit_b && a == b);
    // The speed mode's CUBIN (multiply-adds contracted) is another cache entry.
    let (c, hit_c) = nvrtc::cubin_cached("heads", SOURCES[4].1, "sm_90", true).unwrap();
    assert!(!hit_c && c.starts_with(b"\x7fELF"));
    // -lineinfo: the CUBIN carries a line table naming the source file.
    assert!(String::from_utf8_lossy(&a).contains("heads.cu"), "no line information for heads.cu");
    let _ = std::fs::remove_dir_all(&dir);
    // Prebuilt CUBINs for a machine without NVRTC: one per source and architecture.
    let pre = std::env::temp_dir().join(format!("demovlp-prebuilt-{}", std::process::id()));
    let files = nvrtc::write_prebuilt(&pre, &["sm_90"]).unwrap();
    assert_eq!(files.len(), 2 * SOURCES.len());
    assert!(files.iter().all(|f| std::fs::read(f).unwrap().starts_with(b"\x7fELF")));
    let _ = std::fs::remove_dir_all(pre);
}

//! The CUDA libraries, opened at run time: checked before the first call (cudarc panics when
//! a library is missing), with a message naming the library and how to provide it.

use crate::{DeviceInfo, LIBRARY_HINT};
use cudarc::driver::{result as drv, sys as dsys};

/// One of the shared libraries the backend opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lib {
    Driver,
    Nvrtc,
    Cublas,
    CublasLt,
}

impl Lib {
    pub fn file(self) -> &'static str {
        match self {
            Lib::Driver => "libcuda.so",
            Lib::Nvrtc => "libnvrtc.so",
            Lib::Cublas => "libcublas.so",
            Lib::CublasLt => "libcublasLt.so",
        }
    }

    pub fn present(self) -> bool {
        // SAFETY: these only try to dlopen candidate names.
        unsafe {
            match self {
                Lib::Driver => dsys::is_culib_present(),
                Lib::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                Lib::Cublas => cudarc::cublas::sys::is_culib_present(),
                Lib::CublasLt => cudarc::cublaslt::sys::is_culib_present(),
            }
        }
    }
}

/// `Err` naming every library of `libs` that cannot be opened.
pub fn require(libs: &[Lib]) -> Result<(), String> {
    let missing: Vec<&str> = libs.iter().filter(|l| !l.present()).map(|l| l.file()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let driver = if missing.contains(&"libcuda.so") {
        " (libcuda.so is the NVIDIA driver's: is there an NVIDIA GPU and driver on this machine?)"
    } else {
        ""
    };
    Err(format!("CUDA library not found: {}{driver}; {LIBRARY_HINT}", missing.join(", ")))
}

/// The devices the driver sees (after checking the driver library is there).
pub fn device_count() -> Result<usize, String> {
    require(&[Lib::Driver])?;
    drv::init().map_err(|e| format!("the CUDA driver failed to initialise ({e:?}): no usable NVIDIA GPU?"))?;
    drv::device::get_count().map(|c| c as usize).map_err(|e| format!("cannot count CUDA devices: {e:?}"))
}

/// Libraries, driver initialisation and the device, without compiling anything.
pub fn probe(ordinal: usize) -> Result<DeviceInfo, String> {
    require(&[Lib::Driver])?;
    drv::init().map_err(|e| format!("the CUDA driver failed to initialise ({e:?}): no usable NVIDIA GPU?"))?;
    let count = drv::device::get_count().map_err(|e| format!("cannot count CUDA devices: {e:?}"))? as usize;
    if ordinal >= count {
        return Err(format!("no CUDA device {ordinal}: this machine has {count}"));
    }
    let dev = drv::device::get(ordinal as i32).map_err(|e| format!("CUDA device {ordinal}: {e:?}"))?;
    // SAFETY: `dev` is a valid device handle from the driver.
    let (major, minor, memory_bytes, name, sms) = unsafe {
        use dsys::CUdevice_attribute::*;
        let major = drv::device::get_attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).map_err(|e| format!("{e:?}"))?;
        let minor = drv::device::get_attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR).map_err(|e| format!("{e:?}"))?;
        let mem = drv::device::total_mem(dev).map_err(|e| format!("{e:?}"))?;
        let name = drv::device::get_name(dev).map_err(|e| format!("{e:?}"))?;
        let sms = drv::device::get_attribute(dev, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(|e| format!("{e:?}"))?;
        (major, minor, mem, name, sms)
    };
    Ok(DeviceInfo { ordinal, name, capability: (major, minor), memory_bytes, multiprocessors: sms.max(1) as usize })
}

/// The CUDA libraries' versions, from the libraries themselves (each opened only if present),
/// and the library files this process has mapped once they are open: what it really uses.
#[derive(Clone, Debug, Default)]
pub struct LibraryReport {
    /// `cuDriverGetVersion` (e.g. 12040 for 12.4).
    pub driver: Option<i32>,
    pub nvrtc: Option<(i32, i32)>,
    /// cuBLAS (major, minor, patch).
    pub cublas: Option<(i32, i32, i32)>,
    /// `cublasLtGetVersion` (e.g. 120402).
    pub cublaslt: Option<usize>,
    /// Paths from `/proc/self/maps` ([`crate::mapped_cuda_libraries`]).
    pub opened: Vec<String>,
    /// What could not be opened or asked.
    pub missing: Vec<String>,
}

/// Opens each library that is present, asks its version, then lists the mapped files.
pub fn report() -> LibraryReport {
    let mut r = LibraryReport::default();
    for lib in [Lib::Driver, Lib::Nvrtc, Lib::Cublas, Lib::CublasLt] {
        if !lib.present() {
            r.missing.push(lib.file().to_string());
            continue;
        }
        // SAFETY: plain out-parameters of version queries on a library known to be present.
        unsafe {
            match lib {
                Lib::Driver => {
                    let mut v = 0;
                    if dsys::cuDriverGetVersion(&mut v) == dsys::CUresult::CUDA_SUCCESS {
                        r.driver = Some(v);
                    }
                }
                Lib::Nvrtc => r.nvrtc = crate::nvrtc::version().ok(),
                Lib::Cublas => {
                    use cudarc::cublas::sys::{cublasGetProperty, cublasStatus_t::CUBLAS_STATUS_SUCCESS, libraryPropertyType as P};
                    let mut v = [0; 3];
                    let ok = [P::MAJOR_VERSION, P::MINOR_VERSION, P::PATCH_LEVEL]
                        .into_iter()
                        .zip(v.iter_mut())
                        .all(|(p, out)| cublasGetProperty(p, out) == CUBLAS_STATUS_SUCCESS);
                    if ok {
                        r.cublas = Some((v[0], v[1], v[2]));
                    }
                }
                Lib::CublasLt => r.cublaslt = Some(cudarc::cublaslt::sys::cublasLtGetVersion()),
            }
        }
    }
    r.opened = std::fs::read_to_string("/proc/self/maps").map(|m| crate::mapped_cuda_libraries(&m)).unwrap_or_default();
    r
}

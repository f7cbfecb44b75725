//! Finds NVIDIA's runtime compiler (NVRTC) for the CUDA backend. cudarc opens it by name
//! (`libnvrtc.so.13`, `.12`, ...) through the loader's search path. Where that fails, the library
//! of the `nvidia-cuda-nvrtc` pip package (CUDA 13; `-cu12` for 12) in the project's `.venv`
//! or `python3`'s is loaded by its full path first: the loader then hands cudarc's open by
//! name that same library, as it matches loaded libraries by soname. NVRTC needs no GPU.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::python_env;

const LIBRARIES: [&str; 2] = ["libnvrtc.so.13", "libnvrtc.so.12"];
/// Library folders of the NVIDIA wheels inside `site-packages`: CUDA 13, then CUDA 12.
const WHEEL_FOLDERS: [&str; 2] = ["nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"];

/// Where NVRTC came from (the loader's search path, or the file loaded), or why it was not
/// found; looked for once per process.
pub fn ensure_loaded() -> Result<String, String> {
    static FOUND: OnceLock<Result<String, String>> = OnceLock::new();
    FOUND.get_or_init(find_and_load).clone()
}

fn present() -> bool {
    // SAFETY: only tries to open the library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

fn find_and_load() -> Result<String, String> {
    if present() {
        return Ok("the library search path".into());
    }
    let folders = wheel_folders();
    for path in folders
        .iter()
        .flat_map(|folder| LIBRARIES.map(|name| folder.join(name)))
        .filter(|path| path.is_file())
    {
        // SAFETY: NVRTC's initialisers have no preconditions. The library stays loaded for the
        // life of the process, as cudarc goes on using it by name.
        match unsafe { libloading::Library::new(&path) } {
            Ok(library) => {
                std::mem::forget(library);
                if present() {
                    return Ok(path.display().to_string());
                }
            }
            Err(e) => tracing::warn!("cannot load {}: {e}", path.display()),
        }
    }
    let looked: Vec<String> = folders.iter().map(|f| f.display().to_string()).collect();
    Err(format!(
        "NVRTC not found: neither {} is on the library search path nor in [{}]; install the \
         CUDA runtime compiler with `pip install nvidia-cuda-nvrtc` (CUDA 13; \
         nvidia-cuda-nvrtc-cu12 for 12) into ./.venv, or put the toolkit's lib folder on \
         LD_LIBRARY_PATH",
        LIBRARIES.join(" nor "),
        looked.join(", ")
    ))
}

fn wheel_folders() -> Vec<PathBuf> {
    let mut sites = python_env::venv_site_packages();
    sites.extend(python_env::python3_paths(
        "import site; print('\\n'.join(site.getsitepackages()))",
    ));
    sites
        .iter()
        .flat_map(|site| WHEEL_FOLDERS.map(|folder| site.join(folder)))
        .filter(|folder| folder.is_dir())
        .collect()
}

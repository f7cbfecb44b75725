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
    let mut looked = Vec::new();
    for folder in wheel_folders() {
        for path in LIBRARIES
            .map(|name| folder.join(name))
            .into_iter()
            .filter(|path| path.is_file())
        {
            // SAFETY: NVRTC's initialisers have no preconditions. The library stays loaded for
            // the life of the process, as cudarc goes on using it by name.
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
        looked.push(folder.display().to_string());
    }
    let looked = if looked.is_empty() {
        "no NVIDIA wheel folder in ./.venv or python3's site-packages".to_string()
    } else {
        looked.join(", ")
    };
    Err(format!(
        "NVRTC not found: {} not on the library search path, nor in {looked}; install the \
         CUDA runtime compiler with `pip install nvidia-cuda-nvrtc` (CUDA 13; \
         nvidia-cuda-nvrtc-cu12 for 12) into ./.venv, or put the toolkit's lib folder on \
         LD_LIBRARY_PATH",
        LIBRARIES.join(" or "),
    ))
}

/// The wheels' library folders in the virtual environments first; `python3` is asked (a
/// child process) only when those hold no NVRTC.
fn wheel_folders() -> impl Iterator<Item = PathBuf> {
    let python3 = std::iter::once_with(|| {
        python_env::python3_paths("import site; print('\\n'.join(site.getsitepackages()))")
    })
    .flatten();
    python_env::venv_site_packages()
        .into_iter()
        .chain(python3)
        .flat_map(|site| WHEEL_FOLDERS.map(|folder| site.join(folder)))
        .filter(|folder| folder.is_dir())
}

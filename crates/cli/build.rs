//! With the `libtorch` feature, records libtorch's library folder in the binaries'
//! run-time search path, so `hetero` runs without `LD_LIBRARY_PATH`. torch-sys's build
//! script (`links = "tch"`) reports the folder as `DEP_TCH_LIBTORCH_LIB`.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}

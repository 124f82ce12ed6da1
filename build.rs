//! Generates include/block_int.h from src/ffi with cbindgen.
fn main() {
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=src/ffi/liboxqcow.map");
    println!("cargo:rerun-if-env-changed=OXQCOW_HEADER_OUT");
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    if !std::path::Path::new(&dir).join("src/ffi/mod.rs").exists() {
        return;
    }
    // liboxqcow.so: a versioned soname, and only the symbols the header
    // documents (the version script lists them).
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,liboxqcow.so.0");
        println!("cargo:rustc-cdylib-link-arg=-Wl,--version-script={dir}/src/ffi/liboxqcow.map");
    }
    let config =
        cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).expect("cbindgen.toml");
    let out =
        std::env::var("OXQCOW_HEADER_OUT").unwrap_or_else(|_| format!("{dir}/include/block_int.h"));
    // Only src/ffi (and the modules it declares) makes the header: the
    // engine's own constants stay out of the C ABI.
    cbindgen::Builder::new()
        .with_src(format!("{dir}/src/ffi/mod.rs"))
        .with_config(config)
        .generate()
        .expect("generate block_int.h")
        .write_to_file(out);
}

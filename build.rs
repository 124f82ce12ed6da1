//! Generates include/block_int.h from src/ffi with cbindgen.
fn main() {
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    if !std::path::Path::new(&dir).join("src/ffi/mod.rs").exists() {
        return;
    }
    let config =
        cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).expect("cbindgen.toml");
    let out =
        std::env::var("OXQCOW_HEADER_OUT").unwrap_or_else(|_| format!("{dir}/include/block_int.h"));
    cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
        .expect("generate block_int.h")
        .write_to_file(out);
}

//! Creates an image with the library (a debugging aid): mkimg FILE OPTS SIZE
fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 4 {
        eprintln!("usage: mkimg FILE OPTS SIZE");
        std::process::exit(2);
    }
    let mut o = oxqcow::CreateOptions::default();
    o.parse_into(&a[2]).unwrap();
    o.size = oxqcow::engine::parse_size(&a[3]).unwrap();
    if let Err(e) = oxqcow::engine::create(std::path::Path::new(&a[1]), &o) {
        eprintln!("mkimg: {e}");
        std::process::exit(1);
    }
}

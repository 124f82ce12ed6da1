//! Checks an image with the library and prints the counters (a measuring aid).
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let img = oxqcow::Qcow2::open(std::path::Path::new(&a[1]), &oxqcow::OpenOptions::default())
        .unwrap_or_else(|e| {
            eprintln!("checkimg: {e}");
            std::process::exit(1)
        });
    let t = std::time::Instant::now();
    let r = img.check(0, &mut |l: &str| eprintln!("{l}")).unwrap();
    println!("{r:?} in {:?}", t.elapsed());
}

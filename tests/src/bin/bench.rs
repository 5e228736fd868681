fn main() {
    let c = std::env::var("CARGO").unwrap();
    eprintln!("CARGO={c} manifest={:?}", std::env::var("CARGO_MANIFEST_DIR"));
    let st = std::process::Command::new(c).args(["build", "--release", "-p", "sockacct-tests", "--bins"]).status().unwrap();
    eprintln!("{st}");
}

//! `make-fixtures DIR COUNT [tiny|small|medium]`: write COUNT random llama GGUF models to DIR
//! (`model-000.gguf`, ...) and print their sizes.

use flatmesh_tests::fixtures::{write_llama_gguf, Size};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: make-fixtures DIR COUNT [tiny|small|medium]");
        std::process::exit(2);
    }
    let dir = std::path::Path::new(&args[1]);
    let count: usize = args[2].parse().expect("COUNT must be a number");
    let size = match args.get(3).map(String::as_str).unwrap_or("small") {
        "tiny" => Size::TINY,
        "small" => Size::SMALL,
        "medium" => Size::MEDIUM,
        other => panic!("unknown size {other:?}"),
    };
    std::fs::create_dir_all(dir).expect("create DIR");
    for i in 0..count {
        let path = dir.join(format!("model-{i:03}.gguf"));
        write_llama_gguf(&path, size, i as u64).expect("write fixture");
    }
    let bytes = std::fs::metadata(dir.join("model-000.gguf"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "wrote {count} models of {bytes} bytes each to {}",
        dir.display()
    );
}

//! The test-only "misbehave" builds of Tessera's processes (docs/SECURITY.md "Misbehave builds"): each binary
//! built with its `misbehave` feature tries the hostile operations `TESSERA_MISBEHAVE=PROCESS:OP,...` names
//! right after it confined itself.
//!
//! They are built by `cargo build --features .../misbehave` into a target directory of their own,
//! `target/misbehave/`, so that no ordinary build, and no `cargo build --release`, ever holds the feature: the
//! binaries in target/<profile>/ stay the real ones, and the two builds never overwrite each other.

use std::path::PathBuf;

/// The packages with a misbehave entry, and their binaries.
pub const PACKAGES: &[(&str, &str)] = &[
    ("tessera-core", "tessera-core"),
    ("tessera-chardev", "tessera-chardev"),
    ("tessera-blk", "tessera-blk"),
    ("tessera-net", "tessera-net"),
];

/// target/misbehave/<profile>/, with every binary of [`PACKAGES`] built with its `misbehave` feature (once per
/// test process; cargo makes later calls cheap).
pub fn build_dir() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let profile_dir = crate::bins::profile_dir();
            let profile = profile_dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug").to_string();
            let target = profile_dir.parent().expect("target/<profile>").join("misbehave");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = std::process::Command::new(cargo);
            cmd.args(["build", "--quiet", "--bins", "--target-dir"]).arg(&target);
            if profile == "release" {
                cmd.arg("--release");
            }
            let features: Vec<String> = PACKAGES.iter().map(|(p, _)| format!("{p}/misbehave")).collect();
            for (p, _) in PACKAGES {
                cmd.args(["-p", p]);
            }
            cmd.arg("--features").arg(features.join(","));
            let status = cmd.status().expect("running cargo build for the misbehave binaries");
            assert!(status.success(), "cargo build of the misbehave binaries failed");
            target.join(profile)
        })
        .clone()
}

/// The misbehave build of `binary` (one of [`PACKAGES`]).
pub fn binary(binary: &str) -> PathBuf {
    let path = build_dir().join(binary);
    assert!(path.exists(), "{} does not exist after the misbehave build", path.display());
    path
}

/// A directory for the launcher's `TESSERA_LIBEXEC_DIR`: the ordinary build of every child, except `binary`,
/// which is its misbehave build. The other processes of the graph are the real ones.
pub fn libexec_with(dir: &std::path::Path, binary: &str) -> PathBuf {
    let lib = dir.join(format!("libexec-{binary}"));
    std::fs::create_dir_all(&lib).unwrap();
    for (package, b) in PACKAGES {
        let target = if *b == binary { self::binary(b) } else { crate::bins::binary(package, b) };
        let link = lib.join(b);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(target, link).unwrap();
    }
    lib
}

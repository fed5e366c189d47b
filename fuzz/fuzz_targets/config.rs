//! The config loader (`config::load_text`): TOML syntax, environment overrides, presets,
//! every validation rule and secret resolution.
//!
//! One variable, `EHRSYNC_FUZZ_SECRET`, holds a secret that `{ env = "EHRSYNC_FUZZ_SECRET" }`
//! reads. The loader promises never to show a secret: neither a `ConfigError`, nor a warning,
//! nor the `Debug` of the loaded config may hold its value, unless the config text itself puts
//! those characters there (checked by loading again with another value). `{ file = … }` secrets
//! may make the fuzzer read files: reads only.

#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use ehrsync::config::{ConfigError, Env, Loaded, Secrets, load_text};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "s3cret-value";
/// The same length, no character in common.
const OTHER: &str = "XXXXXXXXXXXX";

static ENV: LazyLock<Env> = LazyLock::new(|| Env::from_iter([("EHRSYNC_FUZZ_SECRET", SECRET)]));
static OTHER_ENV: LazyLock<Env> =
    LazyLock::new(|| Env::from_iter([("EHRSYNC_FUZZ_SECRET", OTHER)]));

fn path() -> &'static Path {
    Path::new("/nonexistent/ehrsync.toml")
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let loaded = load_text(path(), text, &ENV, &Secrets::All);
    let shown = render(&loaded);
    if shown.contains(SECRET) {
        let again = render(&load_text(path(), text, &OTHER_ENV, &Secrets::All));
        assert!(
            again.contains(SECRET),
            "the secret from EHRSYNC_FUZZ_SECRET is shown:\n{shown}"
        );
    }
    if let Err(e) = &loaded {
        assert!(!e.problems.is_empty(), "an error without problems");
    }
});

/// What an operator can see of a load: the error, or the warnings and the config's `Debug`.
fn render(loaded: &Result<Loaded, ConfigError>) -> String {
    match loaded {
        Ok(l) => {
            let mut s = format!("{:?}", l.config);
            for w in &l.warnings {
                s.push('\n');
                s.push_str(&w.to_string());
            }
            s
        }
        Err(e) => format!("{e}\n{e:?}"),
    }
}

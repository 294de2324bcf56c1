//! Command-line parsing shared by the workspace's binaries: a usage error (an unknown flag, a
//! value its parser refuses, a missing option) is one line naming what is wrong and exit status
//! 2, as every other bad input gets; `--help` and `--version` print as usual.

use std::ffi::OsString;

use clap::error::ErrorKind;

/// Parses `args` into `C`, or exits as described above.
pub fn parse_or_exit<C: clap::Parser, T: Into<OsString> + Clone>(
    args: impl IntoIterator<Item = T>,
) -> C {
    C::try_parse_from(args).unwrap_or_else(|e| {
        if matches!(
            e.kind(),
            ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        ) {
            e.exit()
        }
        eprintln!("{}", one_line(&e.render().to_string()));
        std::process::exit(2)
    })
}

/// clap's message up to its usage section, on one line ("error: the following required
/// arguments were not provided: --model <MODEL>").
fn one_line(rendered: &str) -> String {
    rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn usage_errors_fit_on_one_line() {
        let r = "error: the following required arguments were not provided:\n  --model <MODEL>\n\nUsage: x --model <MODEL>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            super::one_line(r),
            "error: the following required arguments were not provided: --model <MODEL>"
        );
    }
}

//! Usage lines that list every flag: clap writes `[OPTIONS]` for the optional ones; each
//! subcommand's usage is rewritten here from its own arguments, so a command added later
//! gets the same treatment.

use clap::{Arg, ArgAction, Command};

fn arg_usage(a: &Arg) -> Option<String> {
    if a.is_hide_set() {
        return None;
    }
    let value = || {
        a.get_value_names()
            .map(|v| v.iter().map(|n| format!("<{n}>")).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| format!("<{}>", a.get_id().as_str().to_uppercase()))
    };
    let takes_value = !matches!(
        a.get_action(),
        ArgAction::SetTrue
            | ArgAction::SetFalse
            | ArgAction::Count
            | ArgAction::Help
            | ArgAction::HelpShort
            | ArgAction::HelpLong
            | ArgAction::Version
    );
    let body = if a.is_positional() {
        value()
    } else {
        let name = match (a.get_long(), a.get_short()) {
            (Some(l), _) => format!("--{l}"),
            (None, Some(s)) => format!("-{s}"),
            (None, None) => return None,
        };
        if matches!(a.get_action(), ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version) {
            return None;
        }
        if takes_value {
            format!("{name} {}", value())
        } else {
            name
        }
    };
    Some(if a.is_required_set() { body } else { format!("[{body}]") })
}

/// `cmd` with the usage line of every leaf subcommand listing all its flags.
pub fn with_full_usage(cmd: Command) -> Command {
    fn walk(cmd: Command, path: &str) -> Command {
        let path = format!("{path} {}", cmd.get_name()).trim().to_string();
        if cmd.has_subcommands() {
            let p = path.clone();
            return cmd.mut_subcommands(move |c| walk(c, &p));
        }
        let parts: Vec<String> = cmd.get_arguments().filter_map(arg_usage).collect();
        let usage = format!("{path} {}", parts.join(" "));
        cmd.override_usage(usage.trim().to_string())
    }
    let name = cmd.get_name().to_string();
    cmd.mut_subcommands(move |c| walk(c, &name))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn every_usage_line_lists_every_flag() {
        let cmd = super::with_full_usage(crate::Cli::command());
        let mut leaves = 0;
        fn check(cmd: &mut clap::Command, leaves: &mut usize) {
            if cmd.has_subcommands() {
                for c in cmd.get_subcommands_mut() {
                    check(c, leaves);
                }
                return;
            }
            *leaves += 1;
            let usage = cmd.render_usage().to_string();
            assert!(!usage.contains("[OPTIONS]"), "{usage}");
            for a in cmd.get_arguments() {
                if let Some(l) = a.get_long().filter(|l| *l != "help" && *l != "version") {
                    assert!(usage.contains(&format!("--{l}")), "{} lacks --{l}: {usage}", cmd.get_name());
                }
            }
        }
        let mut cmd = cmd;
        for c in cmd.get_subcommands_mut() {
            check(c, &mut leaves);
        }
        assert!(leaves >= 13, "{leaves}");
    }
}

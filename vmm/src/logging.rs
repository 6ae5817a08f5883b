// SPDX-License-Identifier: Apache-2.0
//! Logging for `vmm` and the daemons built on it: `tracing` with `tracing-subscriber`, to stderr
//! (stdout is a guest's serial console).
//!
//! - `VMM_LOG` is an env-filter: a level (`debug`) or directives (`warn,vmm::migrate=trace`).
//! - `VMM_LOG_FORMAT=json` writes one JSON object per line (for daemons whose logs a collector
//!   reads); otherwise lines read `PROGRAM: LEVEL: message`, and debug and trace lines carry the
//!   time of day to the µs so the logs of a migration's two ends line up.
//!
//! `log` records (the library crates use the `log` macros) are forwarded to the same subscriber.

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Installs the process's subscriber; `default` is the filter used when `VMM_LOG` is unset or
/// invalid (a bad `VMM_LOG` is reported, not fatal). A second call does nothing.
pub fn init(program: &'static str, default: &str) {
    let (filter, bad) = match std::env::var("VMM_LOG") {
        Ok(v) if !v.trim().is_empty() => match EnvFilter::try_new(&v) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new(default), Some(format!("ignoring VMM_LOG={v:?}: {e}"))),
        },
        _ => (EnvFilter::new(default), None),
    };
    // Colours only on a terminal: logs piped to files (agents, tests) stay plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = if std::env::var("VMM_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().with_current_span(false).try_init()
    } else {
        builder.event_format(Plain { program }).try_init()
    };
    if let (Ok(()), Some(bad)) = (installed, bad) {
        tracing::warn!("{bad}");
    }
}

/// `PROGRAM: LEVEL: message field=value ...`, the format `vmm` has always written.
struct Plain {
    program: &'static str,
}

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let level = *event.metadata().level();
        let name = match level {
            Level::ERROR => "error",
            Level::WARN => "warn",
            Level::INFO => "info",
            Level::DEBUG => "debug",
            Level::TRACE => "trace",
        };
        if level >= Level::DEBUG {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let (s, us) = (now.as_secs() % 86_400, now.subsec_micros());
            write!(w, "{}: {name} {:02}:{:02}:{:02}.{us:06}: ", self.program, s / 3600, s / 60 % 60, s % 60)?;
        } else {
            write!(w, "{}: {name}: ", self.program)?;
        }
        // Spans (daemons use them for context such as the VM a line is about), outermost first.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                write!(w, "{}", span.name())?;
                if let Some(fields) = span.extensions().get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    write!(w, "{{{fields}}}")?;
                }
                write!(w, ": ")?;
            }
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

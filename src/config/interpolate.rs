//! `${VAR}` interpolation of string values in a pipeline TOML.
//!
//! The forms, after POSIX shells: `${VAR}` (an error when unset), `${VAR:-default}` (default
//! when unset or empty), `${VAR:?message}` (an error with the message when unset or empty), and
//! `$$` for a literal `$`. A `$` followed by anything else is kept as it is, so prices and
//! regular expressions in values survive.

/// Looks a variable up; the production lookup is `std::env::var`, tests pass their own.
pub trait Lookup {
    /// The variable's value, or `None` when unset.
    fn get(&self, name: &str) -> Option<String>;
}

/// Looks variables up in the process environment.
pub struct Environment;

impl Lookup for Environment {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<F: Fn(&str) -> Option<String>> Lookup for F {
    fn get(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// Why a `${…}` form could not be expanded; each message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpolateError {
    /// A `${` with no `}` after it.
    #[error("unterminated `${{` in {text:?}: close it with `}}`, or write `$$` for a literal `$`")]
    Unterminated {
        /// The whole string value.
        text: String,
    },
    /// `${…}` whose inside is not a variable name.
    #[error("`${{{body}}}` is not a variable reference: names are letters, digits and `_`")]
    NotAName {
        /// What stood between the braces.
        body: String,
    },
    /// `${VAR}` with VAR unset.
    #[error("environment variable {name} is not set: set it, or write `${{{name}:-default}}`")]
    Unset {
        /// The variable.
        name: String,
    },
    /// `${VAR:?message}` with VAR unset or empty.
    #[error("environment variable {name} is not set or empty{}", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    Required {
        /// The variable.
        name: String,
        /// The file's own message.
        message: String,
    },
    /// `${VAR:…}` with an operator other than `-` and `?`.
    #[error(
        "`${{{body}}}`: unsupported operator `:{op}`; use `${{{name}:-default}}` or `${{{name}:?message}}`"
    )]
    Operator {
        /// What stood between the braces.
        body: String,
        /// The variable.
        name: String,
        /// The operator and what follows it.
        op: String,
    },
}

/// Expands every `${…}` form in `text`; the error says which variable and what to do.
pub fn interpolate(text: &str, vars: &dyn Lookup) -> Result<String, InterpolateError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body_and_tail) = after.strip_prefix('{') {
            let end = body_and_tail
                .find('}')
                .ok_or_else(|| InterpolateError::Unterminated { text: text.into() })?;
            out.push_str(&expand(&body_and_tail[..end], vars)?);
            rest = &body_and_tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Expands the inside of one `${…}`.
fn expand(body: &str, vars: &dyn Lookup) -> Result<String, InterpolateError> {
    let (name, op) = match body.find(':') {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    if name.is_empty()
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        || name.starts_with(|c: char| c.is_ascii_digit())
    {
        return Err(InterpolateError::NotAName { body: body.into() });
    }
    let value = vars.get(name).filter(|v| !v.is_empty());
    match op {
        None => vars
            .get(name)
            .ok_or_else(|| InterpolateError::Unset { name: name.into() }),
        Some(op) if op.starts_with('-') => Ok(value.unwrap_or_else(|| op[1..].to_string())),
        Some(op) if op.starts_with('?') => value.ok_or_else(|| InterpolateError::Required {
            name: name.into(),
            message: op[1..].into(),
        }),
        Some(op) => Err(InterpolateError::Operator {
            body: body.into(),
            name: name.into(),
            op: op.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(name: &str) -> Option<String> {
        match name {
            "RUN_DATE" => Some("2026-11-28".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_the_four_forms() {
        let v = &vars as &dyn Lookup;
        assert_eq!(
            interpolate("s3://b/date=${RUN_DATE}/", v).unwrap(),
            "s3://b/date=2026-11-28/"
        );
        assert_eq!(interpolate("${MISSING:-x}", v).unwrap(), "x");
        assert_eq!(interpolate("${EMPTY:-x}", v).unwrap(), "x");
        assert_eq!(interpolate("${EMPTY}", v).unwrap(), "");
        assert_eq!(interpolate("cost $$5 and $x", v).unwrap(), "cost $5 and $x");
        assert_eq!(interpolate("${RUN_DATE:?needed}", v).unwrap(), "2026-11-28");
    }

    #[test]
    fn unset_variables_are_errors_that_name_them() {
        let v = &vars as &dyn Lookup;
        let e = interpolate("a${NOPE}b", v).unwrap_err().to_string();
        assert!(e.contains("NOPE is not set"), "{e}");
        let e = interpolate("${NOPE:?give the date}", v)
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("give the date"), "{e}");
        assert!(interpolate("${unterminated", v).is_err());
        assert!(interpolate("${1BAD}", v).is_err());
        assert!(interpolate("${A:+x}", v).is_err());
    }
}

//! References to secrets inside other values: `${secret:NAME}` in an upstream's header or
//! environment value is replaced by the secret's value when the value is used (see
//! [`crate::Secrets::expand`]). Templates hold no secret values, so they may be stored and
//! shown as they are.

/// A reference to a secret inside a header or environment value: `${secret:NAME}`.
const SECRET_OPEN: &str = "${secret:";

/// Whether `c` may appear in a secret name.
pub fn is_secret_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')
}

/// One piece of a value template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Literal text.
    Text(&'a str),
    /// A secret's value.
    Secret(&'a str),
}

/// A malformed template: what is wrong with it (the text names no secret value).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(pub String);

/// Splits a value into literal text and secret references. An unterminated or empty
/// reference is an error.
pub fn parse_template(value: &str) -> Result<Vec<Piece<'_>>, TemplateError> {
    let mut pieces = Vec::new();
    let mut rest = value;
    while let Some(at) = rest.find(SECRET_OPEN) {
        if at > 0 {
            pieces.push(Piece::Text(&rest[..at]));
        }
        let after = &rest[at + SECRET_OPEN.len()..];
        let Some(end) = after.find('}') else {
            return Err(TemplateError(format!(
                "unterminated secret reference in '{}': write ${{secret:NAME}}",
                redact_template(value)
            )));
        };
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(is_secret_name_char) {
            return Err(TemplateError(format!(
                "bad secret reference '${{secret:{name}}}': a secret name is letters, digits, '_', '-', '.' and '/'"
            )));
        }
        pieces.push(Piece::Secret(name));
        rest = &after[end + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest));
    }
    Ok(pieces)
}

/// A value with every literal part kept and every secret reference kept as written (templates
/// hold no secret values, so they may be shown; this only guards against printing garbage).
fn redact_template(value: &str) -> String {
    value.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_split_into_text_and_secrets() {
        assert_eq!(
            parse_template("Bearer ${secret:api/token} x").unwrap(),
            vec![
                Piece::Text("Bearer "),
                Piece::Secret("api/token"),
                Piece::Text(" x")
            ]
        );
        assert!(parse_template("${secret:}").is_err());
        assert!(parse_template("${secret:a b}").is_err());
    }
}

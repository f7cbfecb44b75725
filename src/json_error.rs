//! serde_json's errors as a client reads them: serde names the Rust type it expected ("expected
//! struct SubmitOptions with 6 elements"), which means nothing outside this code.

/// The error's text with any "struct Name[ with N elements]" said as "an object".
pub fn describe(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let Some(start) = text.find("struct ") else {
        return text;
    };
    let rest = &text[start + "struct ".len()..];
    let name_end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    let mut tail = &rest[name_end..];
    if let Some(after) = tail.strip_prefix(" with ")
        && let Some(end) = after.find(" element")
    {
        let after_count = &after[end + " element".len()..];
        tail = after_count.strip_prefix('s').unwrap_or(after_count);
    }
    format!("{}an object{tail}", &text[..start])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)] // only deserialised
    struct SubmitOptions {
        path: String,
        model: Option<String>,
    }

    #[test]
    fn type_names_become_an_object() {
        let error = serde_json::from_str::<SubmitOptions>("3").unwrap_err();
        assert_eq!(
            describe(&error),
            "invalid type: integer `3`, expected an object at line 1 column 1"
        );
        let error = serde_json::from_str::<SubmitOptions>("[]").unwrap_err();
        assert!(
            !describe(&error).contains("SubmitOptions"),
            "{}",
            describe(&error)
        );
        let error = serde_json::from_str::<SubmitOptions>("{\"path\": 1}").unwrap_err();
        assert_eq!(describe(&error), error.to_string(), "no type name to hide");
    }
}

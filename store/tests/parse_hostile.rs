//! Hostile and unusual input (issue 14 items 3, 8 and 10): each test feeds
//! the shape the issue describes and checks the error names what is wrong.

use membrane_store::{
    Kind, MAX_DOCUMENT_BYTES, MAX_INPUT_BYTES, ObjectKey, StoreError, parse_documents,
    parse_documents_lenient, parse_keys,
};

fn service(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  ports:\n  - port: 80\n"
    )
}

fn err(text: &str) -> String {
    parse_documents(text).expect_err("should fail").to_string()
}

/// Issue 14.3: 32k small documents in one file. The old splitter padded
/// each document with as many newlines as lines before it (quadratic: 34 s);
/// line numbers must still count from the start of the whole text.
#[test]
fn many_small_documents_keep_absolute_line_numbers() {
    let n = 32_000;
    let mut text = String::new();
    for i in 0..n - 1 {
        text.push_str("---\n");
        text.push_str(&service(&format!("s{i}")));
    }
    let lines_before = text.lines().count();
    // The last document has a syntax error on its third line.
    text.push_str("---\napiVersion: v1\nkind: Service\nmetadata: {name: [oops\n");
    let results = parse_documents_lenient(&text);
    assert_eq!(results.len(), n);
    assert!(results[..n - 1].iter().all(Result::is_ok));
    let last = results[n - 1].as_ref().expect_err("bad last document");
    let message = last.to_string();
    assert!(
        message.starts_with(&format!("document {n}: invalid YAML")),
        "{message}"
    );
    // The bad line is line `lines_before + 4` (1-based); the parser reports
    // the unclosed flow sequence there or on the line after.
    let bad = lines_before + 4;
    assert!(
        message.contains(&format!("line {bad}")) || message.contains(&format!("line {}", bad + 1)),
        "expected line {bad} in {message}"
    );
}

/// Issue 14.3: JSON nested 100k deep (200 KB) took 22–44 s before
/// "recursion limit exceeded"; now the depth limit is named, as JSON and as
/// YAML flow collections.
#[test]
fn deep_nesting_is_refused_by_its_depth() {
    let depth = 100_000;
    let json = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    assert_eq!(json.len(), 200_000);
    let e = err(&json);
    assert!(e.contains("nested deeper than 100 levels"), "{e}");
    assert!(e.starts_with("document 1: invalid JSON"), "{e}");

    let objects = format!("{}{}", "{\"a\":".repeat(depth), "}".repeat(depth));
    let e = err(&objects);
    assert!(e.contains("nested deeper than 100 levels"), "{e}");

    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {}{}\n",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let e = err(&yaml);
    assert_eq!(e, "document 1: nested deeper than 100 levels");

    // Block-style nesting (no brackets) hits the same limit.
    let mut block = String::from("apiVersion: v1\nkind: Service\nmetadata:\n");
    for i in 0..120 {
        block.push_str(&" ".repeat(i + 1));
        block.push_str("a:\n");
    }
    let e = err(&block);
    assert!(e.contains("nested deeper than 100 levels"), "{e}");

    // Real nesting well under the limit is fine, brackets in strings too.
    let ok = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n  annotations: {x: \"[[[[[[\", y: '{{{{'}\n";
    assert_eq!(parse_documents(ok).expect("valid").len(), 1);
}

/// Issue 14.10: a UTF-8 byte order mark was "more than one document".
#[test]
fn byte_order_mark_is_not_content() {
    for text in [
        format!("\u{feff}{}", service("a")),
        format!("\u{feff}---\n{}", service("a")),
        format!("{}---\n\u{feff}{}", service("b"), service("a")),
    ] {
        let objs = parse_documents(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert_eq!(objs.last().expect("object").key().name, "a");
    }
    let json =
        "\u{feff}{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{\"name\":\"a\"}}";
    assert_eq!(parse_documents(json).expect("json with BOM").len(), 1);
}

/// Issue 14.10: duplicate keys were silently last-wins.
#[test]
fn duplicate_keys_are_errors_naming_the_key() {
    let yaml =
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n  labels:\n    app: x\n    app: y\n";
    let e = err(yaml);
    assert!(e.contains("metadata.labels: duplicate key \"app\""), "{e}");
    assert!(e.contains("line 6"), "{e}");

    let top = "apiVersion: v1\nkind: Service\nkind: Namespace\nmetadata: {name: a}\n";
    assert!(err(top).contains("duplicate key \"kind\""), "{}", err(top));

    let json = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a","name":"b"}}"#;
    let e = err(json);
    assert!(e.contains("metadata: duplicate key \"name\""), "{e}");
}

/// Issue 14.10: `port: .inf` was stored as 0.
#[test]
fn non_finite_numbers_are_errors_naming_the_field() {
    for value in [".inf", "-.inf", ".nan", ".NaN"] {
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: a}}\nspec:\n  ports:\n  - port: {value}\n"
        );
        let e = err(&yaml);
        assert!(e.contains("spec.ports[0].port: "), "{value}: {e}");
        assert!(e.contains("not a number"), "{value}: {e}");
    }
}

/// Issue 14.10: JSON syntax errors were reported as "invalid YAML".
#[test]
fn json_syntax_errors_are_json_errors() {
    let json = "{\n  \"apiVersion\": \"v1\",\n  \"kind\": \"Service\"\n  \"metadata\": {}\n}\n";
    let e = err(json);
    assert!(e.starts_with("document 1: invalid JSON: "), "{e}");
    assert!(e.contains("line 4"), "{e}");
    let stream = "{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{\"name\":\"a\"}}\n{\"apiVersion\": }";
    let e = err(stream);
    assert!(e.starts_with("document 2: invalid JSON: "), "{e}");
    // Flow-style YAML that happens to start with `{` still parses as YAML.
    let flow = "{apiVersion: v1, kind: Namespace, metadata: {name: a}}";
    assert_eq!(parse_documents(flow).expect("flow YAML").len(), 1);
}

/// Issue 14.10: delete by apiVersion/kind/metadata failed with "missing field `spec`".
#[test]
fn keys_need_only_api_version_kind_and_metadata() {
    let text = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: web, namespace: shop}\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: web}\n  spec: {bogus: 1}\n";
    let keys = parse_keys(text).expect("keys");
    assert_eq!(
        keys,
        [
            ObjectKey::new(Kind::Ingress, "shop", "web"),
            ObjectKey::new(Kind::Service, "default", "web"),
        ]
    );
    let e = parse_keys("apiVersion: v1\nkind: Service\nmetadata: {namespace: x}\n")
        .expect_err("no name")
        .to_string();
    assert_eq!(e, "document 1: metadata.name: required field is missing");
    let e = parse_keys("apiVersion: v9\nkind: Service\nmetadata: {name: x}\n").expect_err("kind");
    assert!(e.is_unknown_kind(), "{e}");
}

/// Issue 14.8: a size limit per object and per input, with a clear error,
/// checked before parsing; other documents still parse.
#[test]
fn size_limits() {
    let big = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: big}}\nstringData:\n  blob: \"{}\"\n",
        "x".repeat(MAX_DOCUMENT_BYTES)
    );
    let text = format!("{}---\n{big}---\n{}", service("a"), service("b"));
    let results = parse_documents_lenient(&text);
    assert_eq!(results.len(), 3);
    assert!(results[0].is_ok() && results[2].is_ok());
    let e = results[1].as_ref().expect_err("too big");
    assert!(matches!(e.root(), StoreError::TooLarge { .. }), "{e}");
    assert!(
        e.to_string().starts_with("document 2: document is 157"),
        "{e}"
    );
    assert!(
        e.to_string()
            .ends_with("bytes, more than the limit of 1572864 bytes (1.5 MiB)"),
        "{e}"
    );

    let json_big = format!(
        "{{\"apiVersion\":\"v1\",\"kind\":\"Secret\",\"metadata\":{{\"name\":\"big\"}},\"stringData\":{{\"blob\":\"{}\"}}}}",
        "x".repeat(MAX_DOCUMENT_BYTES)
    );
    let e = err(&json_big);
    assert!(e.contains("(1.5 MiB)"), "{e}");

    let huge = " ".repeat(MAX_INPUT_BYTES + 1);
    let e = err(&huge);
    assert_eq!(
        e,
        "document 1: input is 16777217 bytes, more than the limit of 16777216 bytes (16 MiB)"
    );
}

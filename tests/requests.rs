//! Bad requests of the embedding runner and engine, checked on the CPU: every one is an error for
//! its own line, with a message that says what is wrong; nothing else is affected.

use jv4::engine::jsonl::{parse_line, Defaults, Line};
use jv4::engine::{Input, OutputKind, PromptName};
use jv4::model::Task;

fn defaults() -> Defaults {
    Defaults {
        task: Task::Retrieval,
        prompt: PromptName::Query,
        output: OutputKind::Single,
        dims: None,
        limits: Default::default(),
    }
}

fn err(line: Line) -> String {
    match line {
        Line::Err(_, msg) => msg,
        Line::Ok(id, r) => panic!("line {id} parsed as {r:?}"),
    }
}

#[test]
fn good_lines_take_their_own_settings_or_the_defaults() {
    let l = parse_line(1, Ok(br#"{"text": "hi"}"#.to_vec()), &defaults());
    let Line::Ok(id, r) = l else { panic!("{l:?}") };
    assert_eq!(id, 1);
    assert_eq!(r.input, Input::Text("hi".into()));
    assert_eq!((r.task, r.prompt, r.dims), (Task::Retrieval, PromptName::Query, None));
    let l = parse_line(
        7,
        Ok(br#"{"id": "a", "text": "", "task": "code", "prompt_name": "passage", "dims": 256}"#.to_vec()),
        &defaults(),
    );
    let Line::Ok(id, r) = l else { panic!("{l:?}") };
    assert_eq!(id, "a");
    assert_eq!(
        (r.task, r.prompt, r.dims, &r.input),
        (Task::Code, PromptName::Passage, Some(256), &Input::Text("".into()))
    );
}

#[test]
fn invalid_utf8_is_an_error_for_its_line() {
    let m = err(parse_line(3, Ok(vec![b'{', 0xff, 0xfe, b'}']), &defaults()));
    assert!(m.contains("line 3") && m.contains("UTF-8"), "{m}");
}

#[test]
fn malformed_json_is_an_error_for_its_line() {
    for bad in [&b"not json"[..], b"{\"text\": \"unterminated", b"[1, 2]", b"{\"text\": 42}"] {
        let m = err(parse_line(5, Ok(bad.to_vec()), &defaults()));
        assert!(m.contains("line 5"), "{m}");
    }
}

#[test]
fn unknown_task_prompt_or_bad_dims_on_one_line() {
    let m = err(parse_line(2, Ok(br#"{"text": "x", "task": "classification"}"#.to_vec()), &defaults()));
    assert!(m.contains("classification"), "{m}");
    let m = err(parse_line(2, Ok(br#"{"text": "x", "prompt_name": "document"}"#.to_vec()), &defaults()));
    assert!(m.contains("document"), "{m}");
    let m = err(parse_line(2, Ok(br#"{"text": "x", "dims": "big"}"#.to_vec()), &defaults()));
    assert!(m.contains("dims"), "{m}");
    // A number that is not a Matryoshka size is refused by the engine: tests/engine.rs.
}

#[test]
fn image_lines_name_a_file_or_carry_base64_and_bad_ones_fail_alone() {
    let line = r#"{"id": 9, "image": "/some/x.png", "task": "code", "max_pixels": 100352}"#;
    let Line::Ok(_, r) = parse_line(1, Ok(line.as_bytes().to_vec()), &defaults()) else { panic!() };
    assert_eq!(
        (r.task, r.max_pixels, &r.input),
        (Task::Code, Some(100352), &Input::ImagePath("/some/x.png".into()))
    );
    let Line::Ok(_, r) = parse_line(2, Ok(br#"{"image_base64": "aGVsbG8="}"#.to_vec()), &defaults()) else {
        panic!()
    };
    assert_eq!(r.input, Input::ImageBytes(b"hello".to_vec()));
    let m = err(parse_line(3, Ok(br#"{"image_base64": "not base64!"}"#.to_vec()), &defaults()));
    assert!(m.contains("base64"), "{m}");
    let m = err(parse_line(4, Ok(br#"{"image": 5}"#.to_vec()), &defaults()));
    assert!(m.contains("file path"), "{m}");
    // An unreadable path is the engine's error for that request: tests/engine.rs.
}

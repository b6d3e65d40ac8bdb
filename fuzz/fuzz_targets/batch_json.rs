//! `/mq/produce/batch`'s `messages` parsing: any text is a list of bodies or refused, never a
//! panic; string elements are kept byte for byte, other elements as their compact JSON text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqproxy::http::support::batch_bodies;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Some(bodies) = batch_bodies(&text) else {
        assert!(!matches!(
            serde_json::from_str::<serde_json::Value>(&text),
            Ok(serde_json::Value::Array(_))
        ));
        return;
    };
    let Ok(serde_json::Value::Array(elements)) = serde_json::from_str::<serde_json::Value>(&text) else {
        panic!("bodies from text that is not a JSON array: {text:?}");
    };
    assert_eq!(bodies.len(), elements.len());
    for (body, element) in bodies.iter().zip(&elements) {
        match element {
            serde_json::Value::String(s) => assert_eq!(body, s.as_bytes()),
            other => {
                // The compact text parses back to the same value.
                let again: serde_json::Value = serde_json::from_slice(body).expect("compact JSON parses");
                assert_eq!(&again, other);
            }
        }
    }
});

//! Arbitrary bytes into the frame decoder, for every message type a Tessera process receives. The decoder must
//! return a message, ask for more bytes or fail with an error; never panic or allocate past the limits. A
//! decoded message must re-encode to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use tessera_ipc::frame;
use tessera_ipc::messages::{ChardevToCore, ChildToLauncher, CoreToChardev, Hello, LauncherToChild};

fn check<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(Some(d)) = frame::decode::<T>(data) {
        assert!(d.consumed <= data.len());
        let again = frame::encode(&d.msg, d.fds).expect("a decoded message re-encodes");
        let back = frame::decode::<T>(&again).expect("re-encoded frame decodes").expect("complete");
        assert_eq!(back.msg, d.msg);
    }
}

fuzz_target!(|data: &[u8]| {
    check::<Hello>(data);
    check::<LauncherToChild>(data);
    check::<ChildToLauncher>(data);
    check::<CoreToChardev>(data);
    check::<ChardevToCore>(data);
});

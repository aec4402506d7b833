//! ServerDef and ClusterDef bytes, as `Server(server_def=...)` and TensorFlow's clients hand them
//! over: refused, or a definition that encodes back to one that decodes the same.
#![no_main]

use distsrv::base::cluster::ServerDef;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if let Ok(def) = ServerDef::decode(input) {
        let again = ServerDef::decode(&def.encode()).expect("an encoded ServerDef decodes");
        assert_eq!(again, def);
    }
});

//! The decoders for the backend messages pgferry reads itself.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pgferry_wire::messages::{
    decode_backend_key_data, decode_command_complete, decode_data_row, decode_parameter_status,
    decode_ready_for_query, decode_row_description,
};
use pgferry_wire::ErrorFields;

fuzz_target!(|data: &[u8]| {
    let _ = ErrorFields::decode(&Bytes::copy_from_slice(data)).map(|f| f.ends_session());
    let _ = decode_parameter_status(data);
    let _ = decode_backend_key_data(data);
    let _ = decode_ready_for_query(data);
    let _ = decode_row_description(data);
    let _ = decode_data_row(data);
    let _ = decode_command_complete(data);
});

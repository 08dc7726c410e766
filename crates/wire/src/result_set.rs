//! Result sets the proxy answers itself (the SQL admin console): a
//! RowDescription of text or bigint columns, DataRows, CommandComplete,
//! EmptyQueryResponse and NoticeResponse.

use bytes::{BufMut, BytesMut};
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription};
use pgwire::messages::response::{CommandComplete, EmptyQueryResponse, NoticeResponse};

use crate::messages::enc;
use crate::EncodeError;

/// A column's type as clients see it: psql aligns `Int8` to the right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    Text,
    Int8,
}

impl ColumnType {
    fn oid_and_size(self) -> (u32, i16) {
        match self {
            ColumnType::Text => (25, -1),
            ColumnType::Int8 => (20, 8),
        }
    }
}

pub fn encode_row_description(
    buf: &mut BytesMut,
    columns: &[(&str, ColumnType)],
) -> Result<(), EncodeError> {
    let fields = columns
        .iter()
        .map(|(name, ty)| {
            let (type_id, type_size) = ty.oid_and_size();
            FieldDescription::new((*name).to_owned(), 0, 0, type_id, type_size, -1, 0)
        })
        .collect();
    enc(&RowDescription::new(fields), buf)
}

/// One row of text-format values (`None`: NULL).
pub fn encode_data_row(buf: &mut BytesMut, values: &[Option<&str>]) -> Result<(), EncodeError> {
    let count = i16::try_from(values.len()).map_err(|_| EncodeError::new("too many columns"))?;
    let mut data = BytesMut::new();
    for v in values {
        match v {
            None => data.put_i32(-1),
            Some(s) => {
                let len = i32::try_from(s.len()).map_err(|_| EncodeError::new("value too long"))?;
                data.put_i32(len);
                data.put_slice(s.as_bytes());
            }
        }
    }
    enc(&DataRow::new(data, count), buf)
}

pub fn encode_command_complete(buf: &mut BytesMut, tag: &str) -> Result<(), EncodeError> {
    enc(&CommandComplete::new(tag.to_owned()), buf)
}

pub fn encode_empty_query_response(buf: &mut BytesMut) -> Result<(), EncodeError> {
    enc(&EmptyQueryResponse::new(), buf)
}

/// A NOTICE with SQLSTATE 00000.
pub fn encode_notice(buf: &mut BytesMut, message: &str) -> Result<(), EncodeError> {
    let fields = vec![
        (b'S', "NOTICE".to_owned()),
        (b'V', "NOTICE".to_owned()),
        (b'C', "00000".to_owned()),
        (b'M', message.to_owned()),
    ];
    enc(&NoticeResponse::new(fields), buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::take_message;
    use crate::messages::{decode_command_complete, decode_data_row, decode_row_description};

    #[test]
    fn a_result_set_decodes_back() {
        let mut buf = BytesMut::new();
        encode_row_description(
            &mut buf,
            &[("name", ColumnType::Text), ("n", ColumnType::Int8)],
        )
        .unwrap();
        encode_data_row(&mut buf, &[Some("pg1"), None]).unwrap();
        encode_command_complete(&mut buf, "SHOW").unwrap();
        encode_empty_query_response(&mut buf).unwrap();
        encode_notice(&mut buf, "hello").unwrap();
        let m = take_message(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(m.tag, b'T');
        assert_eq!(decode_row_description(&m.body).unwrap(), vec!["name", "n"]);
        let m = take_message(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(m.tag, b'D');
        assert_eq!(
            decode_data_row(&m.body).unwrap(),
            vec![Some(&b"pg1"[..]), None]
        );
        let m = take_message(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(decode_command_complete(&m.body).unwrap(), "SHOW");
        let m = take_message(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!((m.tag, m.body.len()), (b'I', 0));
        let m = take_message(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(m.tag, b'N');
        assert!(buf.is_empty());
    }
}

//! What is learned from a photo's bytes besides its class: their SHA-256 (the result cache's key)
//! and what the photo says of itself (EXIF date, GPS and camera; its size from its header).

use std::io::Cursor;

use exif::{In, Tag, Value};
use reefline_schemas::Exif;
use reefline_schemas::rules::{SHORT_TEXT_BYTES, truncate};
use sha2::{Digest, Sha256};

/// What the bytes of one photo say.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Photo {
    /// Lowercase hex.
    pub sha256: String,
    pub exif: Exif,
}

/// Hashes the bytes and reads their EXIF and header; never fails (what cannot be read is `None`).
pub fn learn(bytes: &[u8]) -> Photo {
    let sha256 = hex::encode(Sha256::digest(bytes));
    let mut exif = read_exif(bytes).unwrap_or_default();
    if let Ok((width, height)) = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(drop)
        .and_then(|r| r.into_dimensions().map_err(drop))
    {
        exif.width = i32::try_from(width).ok();
        exif.height = i32::try_from(height).ok();
    }
    Photo { sha256, exif }
}

fn read_exif(bytes: &[u8]) -> Option<Exif> {
    let fields = exif::Reader::new().read_from_container(&mut Cursor::new(bytes)).ok()?;
    let text = |tag: Tag| {
        let field = fields.get_field(tag, In::PRIMARY)?;
        match &field.value {
            Value::Ascii(parts) => {
                let joined: String =
                    parts.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect::<Vec<_>>().join(" ");
                let clean: String = joined.chars().filter(|c| !c.is_control()).collect();
                let clean = clean.trim();
                (!clean.is_empty()).then(|| truncate(clean, SHORT_TEXT_BYTES).to_owned())
            }
            _ => None,
        }
    };
    let rationals = |tag: Tag| match &fields.get_field(tag, In::PRIMARY)?.value {
        Value::Rational(r) if !r.is_empty() => Some(r.iter().map(|r| r.to_f64()).collect::<Vec<f64>>()),
        _ => None,
    };
    let coordinate = |value: Tag, reference: Tag, negative: &str, limit: f64| {
        let parts = rationals(value)?;
        let degrees = parts.first()? + parts.get(1).unwrap_or(&0.0) / 60.0 + parts.get(2).unwrap_or(&0.0) / 3600.0;
        let sign = if text(reference).is_some_and(|r| r.eq_ignore_ascii_case(negative)) { -1.0 } else { 1.0 };
        // To 1e-7 degrees (about a centimetre): the rest is the rationals' rounding.
        let degrees = (sign * degrees * 1e7).round() / 1e7;
        (degrees.is_finite() && degrees.abs() <= limit).then_some(degrees)
    };
    let altitude = rationals(Tag::GPSAltitude).and_then(|a| a.first().copied()).filter(|a| a.is_finite() && *a < 1e6).map(|a| {
        let below = matches!(fields.get_field(Tag::GPSAltitudeRef, In::PRIMARY).map(|f| &f.value), Some(Value::Byte(b)) if b.first() == Some(&1));
        if below { -a } else { a }
    });
    Some(Exif {
        taken_at: text(Tag::DateTimeOriginal).and_then(|t| iso8601(&t, text(Tag::OffsetTimeOriginal).as_deref())),
        gps_latitude: coordinate(Tag::GPSLatitude, Tag::GPSLatitudeRef, "S", 90.0),
        gps_longitude: coordinate(Tag::GPSLongitude, Tag::GPSLongitudeRef, "W", 180.0),
        gps_altitude: altitude,
        camera_make: text(Tag::Make),
        camera_model: text(Tag::Model),
        width: None,
        height: None,
    })
}

/// EXIF's `2026:11:20 14:03:07` as `2026-11-20T14:03:07`, with `+10:00` when the photo gives its
/// offset; `None` when it is not a date.
fn iso8601(datetime: &str, offset: Option<&str>) -> Option<String> {
    let parsed = chrono::NaiveDateTime::parse_from_str(datetime.trim(), "%Y:%m:%d %H:%M:%S").ok()?;
    let local = parsed.format("%Y-%m-%dT%H:%M:%S").to_string();
    match offset.map(str::trim) {
        Some(offset) if offset.len() == 6 && offset.parse::<chrono::FixedOffset>().is_ok() => {
            Some(format!("{local}{offset}"))
        }
        _ => Some(local),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exif_dates_read_as_iso_8601() {
        assert_eq!(iso8601("2026:11:20 14:03:07", None).as_deref(), Some("2026-11-20T14:03:07"));
        assert_eq!(iso8601("2026:11:20 14:03:07", Some("+10:00")).as_deref(), Some("2026-11-20T14:03:07+10:00"));
        assert_eq!(iso8601("0000:00:00 00:00:00", None), None);
    }

    #[test]
    fn bytes_without_exif_still_have_their_hash_and_size() {
        let mut png = Vec::new();
        image::RgbImage::new(3, 2).write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        let photo = learn(&png);
        assert_eq!(photo.sha256, hex::encode(Sha256::digest(&png)));
        assert_eq!((photo.exif.width, photo.exif.height, photo.exif.taken_at), (Some(3), Some(2), None));
        assert_eq!(learn(b"not an image").exif, Exif::default());
    }
}

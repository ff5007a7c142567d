//! What an export is asked for: its format and filters, checked, and the SQL and arguments that
//! select a feed's or batch's results.

use serde::Deserialize;
use sqlx::postgres::PgArguments;

use super::camtrap;
use crate::error::ApiError;

/// What to export, and which results.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)] // a misspelt filter is refused, not silently left out
pub struct ExportQuery {
    /// `csv` (the default), `ndjson`, `megadetector` (the MegaDetector batch output format 1.6, as
    /// Timelapse and AddaxAI read it: one whole-image detection per image holding the top-5), or
    /// `coco-camera-traps` (images with location and time, image-level annotations of the top class),
    /// or `camtrap-dp` (a ZIP of a Camtrap DP 1.0.2 package: deployments, media and media-level
    /// observations of the classified images; 422 `missing_fields` when a field it requires
    /// cannot be filled).
    format: Option<String>,
    /// `ok` or `error`.
    status: Option<String>,
    /// Only images whose top class is (`true`) or is not (`false`) a marine animal.
    marine: Option<bool>,
    /// Only this marine group (`shark`, `ray`, `bony_fish`, ...).
    group: Option<String>,
    /// Only images whose top score is at least this, 0 to 1.
    #[param(minimum = 0.0, maximum = 1.0)]
    min_score: Option<f64>,
    /// `megadetector`: a prefix of the image URLs that `file` leaves out (e.g.
    /// `s3://reef-survey/survey-2026/`), so that Timelapse finds the images below its folder.
    relative_to: Option<String>,
    /// `camtrap-dp`: the UTC offset of times given without one (EXIF times), e.g. `+10:00`.
    utc_offset: Option<String>,
    /// `camtrap-dp`: the latitude of deployments whose images give none.
    #[param(minimum = -90.0, maximum = 90.0)]
    latitude: Option<f64>,
    /// `camtrap-dp`: the longitude of deployments whose images give none.
    #[param(minimum = -180.0, maximum = 180.0)]
    longitude: Option<f64>,
    /// `camtrap-dp`: `project.samplingDesign` (`opportunistic` unless given): simpleRandom,
    /// systematicRandom, clusteredRandom, experimental, targeted or opportunistic.
    sampling_design: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Format {
    Csv,
    Ndjson,
    MegaDetector,
    Coco,
    CamtrapDp,
}

/// The checked query.
pub(crate) struct Filters {
    pub(super) format: Format,
    status: Option<String>,
    marine: Option<bool>,
    group: Option<String>,
    min_score: Option<f64>,
    pub(super) relative_to: Option<String>,
    /// The Camtrap DP options, for that format.
    pub(super) camtrap: Option<camtrap::Options>,
}

/// A `status` filter is `ok` or `error`; a `min_score`, from 0 to 1 (the exports' and the search's).
pub(crate) fn check_status_and_score(status: Option<&str>, min_score: Option<f64>) -> Result<(), ApiError> {
    if let Some(status) = status.filter(|s| !matches!(*s, "ok" | "error")) {
        let message = format!("`{}` is neither ok nor error", reefline_schemas::rules::truncate(status, 32));
        return Err(ApiError::InvalidField { field: "status", message });
    }
    if let Some(score) = min_score.filter(|s| !(0.0..=1.0).contains(s)) {
        return Err(ApiError::InvalidField { field: "min_score", message: format!("{score} is not from 0 to 1") });
    }
    Ok(())
}

impl ExportQuery {
    /// A format and its options, with no filters of its own (a search's export filters in its query).
    /// `status` is given only to refuse errors in a Camtrap DP package.
    pub(crate) fn format_only(
        format: Option<String>,
        status: Option<String>,
        relative_to: Option<String>,
        utc_offset: Option<String>,
        (latitude, longitude): (Option<f64>, Option<f64>),
        sampling_design: Option<String>,
    ) -> Self {
        Self { format, status, relative_to, utc_offset, latitude, longitude, sampling_design, ..Self::default() }
    }

    pub(crate) fn check(self) -> Result<Filters, ApiError> {
        let format = match self.format.as_deref().unwrap_or("csv") {
            "csv" => Format::Csv,
            "ndjson" => Format::Ndjson,
            "megadetector" => Format::MegaDetector,
            "coco-camera-traps" => Format::Coco,
            "camtrap-dp" => Format::CamtrapDp,
            other => {
                let message = format!(
                    "`{}` is not one of csv, ndjson, megadetector, coco-camera-traps, camtrap-dp",
                    reefline_schemas::rules::truncate(other, 32)
                );
                return Err(ApiError::InvalidField { field: "format", message });
            }
        };
        check_status_and_score(self.status.as_deref(), self.min_score)?;
        if self.relative_to.is_some() && format != Format::MegaDetector {
            let message = "applies to format=megadetector only".to_owned();
            return Err(ApiError::InvalidField { field: "relative_to", message });
        }
        let camtrap = self.camtrap_options(format)?;
        if format == Format::CamtrapDp && self.status.as_deref() == Some("error") {
            let message = "a Camtrap DP package holds classified images only".to_owned();
            return Err(ApiError::InvalidField { field: "status", message });
        }
        Ok(Filters {
            format,
            camtrap,
            status: self.status,
            marine: self.marine,
            group: self.group,
            min_score: self.min_score,
            relative_to: self.relative_to,
        })
    }

    fn camtrap_options(&self, format: Format) -> Result<Option<camtrap::Options>, ApiError> {
        let given = [
            ("utc_offset", self.utc_offset.is_some()),
            ("latitude", self.latitude.is_some()),
            ("longitude", self.longitude.is_some()),
            ("sampling_design", self.sampling_design.is_some()),
        ];
        if format != Format::CamtrapDp {
            return match given.iter().find(|(_, given)| *given) {
                Some((field, _)) => {
                    Err(ApiError::InvalidField { field, message: "applies to format=camtrap-dp only".to_owned() })
                }
                None => Ok(None),
            };
        }
        let invalid = |field, message: String| ApiError::InvalidField { field, message };
        let utc_offset = match self.utc_offset.as_deref() {
            Some(text) => Some(camtrap::parse_offset(text).ok_or_else(|| {
                let text = reefline_schemas::rules::truncate(text, 32);
                invalid("utc_offset", format!("`{text}` is not a UTC offset such as +10:00, -05:30 or Z"))
            })?),
            None => None,
        };
        let coordinates = match (self.latitude, self.longitude) {
            (None, None) => None,
            (Some(lat), Some(lon)) if (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon) => {
                Some((lat, lon))
            }
            (Some(_), Some(_)) => {
                return Err(invalid("latitude", "latitude is from -90 to 90 and longitude from -180 to 180".into()));
            }
            (None, Some(_)) => return Err(invalid("latitude", "is needed with longitude".into())),
            (Some(_), None) => return Err(invalid("longitude", "is needed with latitude".into())),
        };
        let sampling_design = self.sampling_design.clone().unwrap_or_else(|| "opportunistic".to_owned());
        if !camtrap::SAMPLING_DESIGNS.contains(&sampling_design.as_str()) {
            let text = reefline_schemas::rules::truncate(&sampling_design, 32);
            let message = format!("`{text}` is not one of {}", camtrap::SAMPLING_DESIGNS.join(", "));
            return Err(invalid("sampling_design", message));
        }
        Ok(Some(camtrap::Options { utc_offset, coordinates, sampling_design }))
    }
}

/// The filters as SQL over `results`, binding `$2` to `$6` (`$6`: the caller's tenant, or none for
/// an admin: a record produced straight to Kafka under another tenant's batch id is not theirs).
pub(super) const FILTERS: &str = "($2::text IS NULL OR status = $2)
    AND ($3::bool IS NULL OR (marine_group IS NOT NULL) = $3)
    AND ($4::text IS NULL OR marine_group = $4)
    AND ($5::float8 IS NULL OR (predictions->0->>'score')::float8 >= $5)
    AND ($6::text IS NULL OR tenant = $6)";

/// Adds `value` to `arguments`.
pub(crate) fn bind<'q, T>(arguments: &mut PgArguments, value: T) -> Result<(), ApiError>
where
    T: 'q + sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    use sqlx::Arguments as _;
    arguments.add(value).map_err(|e| ApiError::Database(sqlx::Error::Encode(e)))
}

impl Filters {
    /// Whether the export is a CSV, whose columns are the results' metadata keys.
    pub(crate) fn has_columns(&self) -> bool {
        self.format == Format::Csv
    }

    /// `$1` (the feed's or batch's id) to `$6` of [`FILTERS`].
    pub(super) fn arguments(&self, id: &str, scope: Option<String>) -> Result<PgArguments, ApiError> {
        let mut arguments = PgArguments::default();
        bind(&mut arguments, id.to_owned())?;
        bind(&mut arguments, self.status.clone())?;
        bind(&mut arguments, self.marine)?;
        bind(&mut arguments, self.group.clone())?;
        bind(&mut arguments, self.min_score)?;
        bind(&mut arguments, scope)?;
        Ok(arguments)
    }
}

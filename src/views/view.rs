//! PLACEHOLDER until the evaluator lands.
#[derive(Debug)]
pub struct ViewDefinition {
    cols: Vec<Column>,
}
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub ty: Option<String>,
    pub collection: bool,
}
#[derive(Debug)]
pub struct ViewError(String);
impl std::fmt::Display for ViewError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl ViewDefinition {
    pub fn parse(_json: &serde_json::Value) -> Result<ViewDefinition, ViewError> {
        Err(ViewError("placeholder".into()))
    }
    pub fn name(&self) -> &str {
        ""
    }
    pub fn resource(&self) -> &str {
        ""
    }
    pub fn columns(&self) -> &[Column] {
        &self.cols
    }
    pub fn evaluate(
        &self,
        _resource: &serde_json::Value,
    ) -> Result<Vec<Vec<serde_json::Value>>, ViewError> {
        Ok(Vec::new())
    }
}

// Colour grade. Identity: hue 0, saturation 1, contrast 1, brightness 0.
uniform mat3 u_grade_hue_matrix;    // hue rotation in YIQ, built on the CPU
uniform float u_grade_saturation;
uniform float u_grade_contrast;
uniform float u_grade_brightness;

vec3 fx_grade(vec3 c) {
    c = u_grade_hue_matrix * c;
    float luma = dot(c, vec3(0.299, 0.587, 0.114));
    c = mix(vec3(luma), c, u_grade_saturation);
    c = (c - 0.5) * u_grade_contrast + 0.5 + u_grade_brightness;
    return clamp(c, 0.0, 1.0);
}

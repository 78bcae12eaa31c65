// RGB shift: red and blue are sampled apart along an angle. Identity: amount 0.
uniform float u_rgbshift_amount;    // fraction of the width
uniform float u_rgbshift_angle;     // degrees

vec2 fx_rgbshift_offset() {
    float a = radians(u_rgbshift_angle);
    return u_rgbshift_amount * vec2(cos(a), sin(a) * u_resolution.x / u_resolution.y);
}

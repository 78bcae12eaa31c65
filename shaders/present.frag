#version 330
// Draws the output framebuffer into the window's letterboxed viewport. The window's
// y axis points up while our textures store the top row first: flip here, only here.
uniform sampler2D u_input;
in vec2 uv;
out vec4 frag;
void main() {
    frag = vec4(texture(u_input, vec2(uv.x, 1.0 - uv.y)).rgb, 1.0);
}
